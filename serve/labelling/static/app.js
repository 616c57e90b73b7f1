'use strict';
// The annotator page. Model text is shown with textContent only: it is text, never HTML.
const root = document.body.dataset.root;
const TOKEN_KEY = 'alignray-label-token';
const ROWS = ['1234', 'qwer', 'asdf', 'zxcv', 'tyui', 'ghjk'];  // keys of overall, then of each criterion
const CHOICES = [['left', 'A is better'], ['right', 'B is better'], ['tie', 'Tie'], ['bad', 'Both bad']];
const $ = (id) => document.getElementById(id);
const state = {item: null, criteria: [], busy: false};

function token() {
  // The personal link carries the token in the fragment, which browsers never send to a server.
  const m = location.hash.match(/^#t=([A-Za-z0-9_-]+)$/);
  if (m) {
    localStorage.setItem(TOKEN_KEY, m[1]);
    history.replaceState(null, '', location.pathname);
  }
  return localStorage.getItem(TOKEN_KEY);
}

async function api(path, body) {
  const opts = {headers: {'Authorization': 'Bearer ' + token()}, cache: 'no-store'};
  if (body !== undefined) {
    opts.method = 'POST';
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(root + path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const err = new Error((data && data.error && data.error.message) || r.statusText);
    err.status = r.status;
    // The app answers in JSON; a text answer is Serve's proxy while the app is down or restarting.
    err.transient = r.status >= 500 || data === null;
    throw err;
  }
  return data;
}

function status(text) { $('status').textContent = text; }

function buildForm(criteria) {
  const box = $('criteria');
  box.replaceChildren();
  ['overall', ...criteria].forEach((name, i) => {
    const fs = document.createElement('fieldset');
    fs.dataset.criterion = name;
    if (name === 'overall') fs.classList.add('required');
    const legend = document.createElement('legend');
    legend.textContent = name === 'overall' ? 'Overall' : name.replace(/_/g, ' ');
    fs.append(legend);
    CHOICES.forEach(([value, text], j) => {
      const label = document.createElement('label');
      const input = document.createElement('input');
      input.type = 'radio';
      input.name = 'c-' + name;
      input.value = value;
      input.id = 'c-' + name + '-' + value;
      label.append(input, ' ' + text + ' ');
      const key = ROWS[i] && ROWS[i][j];
      if (key) {
        const kbd = document.createElement('kbd');
        kbd.textContent = key.toUpperCase();
        label.append(kbd);
      }
      fs.append(label);
    });
    box.append(fs);
  });
}

function show(data) {
  state.item = data.item;
  $('progress').textContent = data.progress.labelled + ' labelled · ' + data.progress.left + ' left';
  $('work').hidden = !data.item;
  $('done').hidden = !!data.item;
  if (!data.item) return;
  $('prompt').textContent = data.item.prompt;
  $('left').textContent = data.item.left;
  $('right').textContent = data.item.right;
  document.querySelectorAll('#criteria input').forEach((i) => { i.checked = false; });
  for (const [name, value] of Object.entries(data.previous || {})) {
    const el = $('c-' + name + '-' + value);
    if (el) el.checked = true;
  }
  $('comment').value = data.comment || '';
}

function chosen() {
  const out = {};
  for (const fs of document.querySelectorAll('#criteria fieldset')) {
    const checked = fs.querySelector('input:checked');
    if (checked) out[fs.dataset.criterion] = checked.value;
  }
  return out;
}

function requestId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

async function act(fn) {
  if (state.busy) return;
  state.busy = true;
  try {
    await fn();
  } catch (err) {
    status(err.status === 401 ? 'This link is not valid any more: ask for a new one.' : 'Error: ' + err.message);
  } finally {
    state.busy = false;
  }
}

async function postWithRetry(path, body) {
  // A label whose answer was lost (server restarting) is sent again with the same request_id: stored once.
  for (let attempt = 0; ; attempt++) {
    try {
      return await api(path, body);
    } catch (err) {
      if ((err.status !== undefined && !err.transient) || attempt >= 60) throw err;
      status('Server unreachable, retrying…');
      await new Promise((done) => setTimeout(done, 1000));
    }
  }
}

function submit() {
  if (!state.item) return;
  const choices = chosen();
  if (!choices.overall) {
    status('Choose the overall verdict first (keys 1-4).');
    return;
  }
  const body = {slot: state.item.slot, choices, comment: $('comment').value, request_id: requestId()};
  return act(async () => {
    status('saving…');
    const saved = await postWithRetry('/api/label', body);
    show(await api('/api/next'));
    status('saved label ' + saved.label);
  });
}

function skip() {
  if (!state.item) return;
  return act(async () => {
    show(await api('/api/skip', {slot: state.item.slot}));
    status('skipped');
  });
}

function undo() {
  return act(async () => {
    const data = await api('/api/undo', {});
    show(data);
    status(data.previous ? 'undone: label it again' : 'nothing to undo');
  });
}

function onKey(e) {
  if (e.target.tagName === 'TEXTAREA') {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit(); }
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === 'Enter') { e.preventDefault(); submit(); return; }
  if (e.key === 'Backspace') { e.preventDefault(); undo(); return; }
  const key = e.key.toLowerCase();
  if (key === 'n') { skip(); return; }
  const names = ['overall', ...state.criteria];
  ROWS.forEach((row, i) => {
    const j = row.indexOf(key);
    if (j >= 0 && names[i]) {
      const el = $('c-' + names[i] + '-' + CHOICES[j][0]);
      if (el) el.checked = true;
    }
  });
}

document.addEventListener('DOMContentLoaded', async () => {
  if (!token()) { $('login').hidden = false; return; }
  $('judgement').addEventListener('submit', (e) => { e.preventDefault(); submit(); });
  $('skip').addEventListener('click', skip);
  $('undo').addEventListener('click', undo);
  document.addEventListener('keydown', onKey);
  try {
    const me = await api('/api/me');
    state.criteria = me.criteria;
    $('who').textContent = me.name;
    buildForm(me.criteria);
    $('tools').hidden = false;
    show(await api('/api/next'));
    status('ready');
  } catch (err) {
    if (err.status === 401 || err.status === 403) $('login').hidden = false;
    status('Error: ' + err.message);
  }
});
