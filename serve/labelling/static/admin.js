'use strict';
// The admin page: statistics, agreement, recent items with reward-model scores, invitations.
const root = document.body.dataset.root;
const TOKEN_KEY = 'alignray-admin-token';
const $ = (id) => document.getElementById(id);

function token() {
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
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = new Error((data.error && data.error.message) || r.statusText);
    err.status = r.status;
    throw err;
  }
  return data;
}

function fill(id, rows) {
  // Every cell is set with textContent: names, prompts and responses are text, never HTML.
  const body = document.querySelector('#' + id + ' tbody');
  body.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement('tr');
    for (const cell of cells) {
      const td = document.createElement('td');
      if (typeof cell === 'object' && cell !== null) {
        const pre = document.createElement('pre');
        pre.textContent = cell.text;
        td.append(pre);
      } else {
        td.textContent = cell === null || cell === undefined ? '–' : String(cell);
      }
      tr.append(td);
    }
    return tr;
  }));
}

const num = (x) => (x === null || x === undefined ? null : Number(x).toFixed(3));

async function refresh() {
  const s = await api('/api/admin/stats');
  $('slots').textContent = s.slots.done + ' labelled · ' + s.slots.claimed + ' in progress · ' + s.slots.open + ' open';
  fill('annotators', s.annotators.map((a) => [a.name, a.role, a.labels, a.last_hour, a.skips]));
  fill('hours', s.per_hour.map((h) => [h.hour, h.labels]));
  fill('agreement', Object.entries(s.agreement).map(([name, a]) => [
    name, num(a.alpha), a.overlapping_items,
    a.pairs.map((p) => p.annotators.join(' / ') + ': ' + (num(p.kappa) ?? '–') + ' (' + p.items + ')').join('; '),
  ]));
  const items = await api('/api/admin/items?limit=20');
  fill('items', items.map((it) => [it.item, {text: it.prompt}, {text: it.response_a}, num(it.score_a),
    {text: it.response_b}, num(it.score_b), it.labels]));
  $('status').textContent = 'updated ' + new Date().toLocaleTimeString();
}

document.addEventListener('DOMContentLoaded', async () => {
  if (!token()) { $('login').hidden = false; return; }
  $('invite').addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      const out = await api('/api/admin/invite', {name: $('invite-name').value, role: $('invite-role').value});
      $('invite-link').textContent = location.origin + out.link;
      await refresh();
    } catch (err) {
      $('status').textContent = 'Error: ' + err.message;
    }
  });
  try {
    await refresh();
    $('admin').hidden = false;
    setInterval(() => refresh().catch((err) => { $('status').textContent = 'Error: ' + err.message; }), 10000);
  } catch (err) {
    if (err.status === 401 || err.status === 403) $('login').hidden = false;
    $('status').textContent = 'Error: ' + err.message;
  }
});
