"""The labelling page in headless Chromium (Playwright driving Debian's chromium): keyboard and mouse
labelling with undo, model text that stays inert, the admin page, and a cross-site attacker page.

``ALIGNRAY_DOCS_SCREENSHOT=docs/labelling.png pytest tests/serve/labelling/test_browser.py -k five``
also writes the README's screenshot.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import threading

import pytest

from serve.app import ServeSettings
from serve.labelling.application import delete_label_app, deploy_label_app
from serve.labelling.reports import export_rows
from serve.labelling.settings import FeedbackSettings
from serve.labelling.store import LabelStore
from tests.serve.labelling.conftest import ADMIN_KEY

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EVIL = '<script>alert("s")</script><img src=x onerror="alert(\'i\')"> & <b>bold</b>'
REVIEWS = [
    (
        "The film opens with a long shot of the harbour, and",
        "it is beautiful: the best opening I have seen in years.",
        "the camera just sits there. I almost left.",
    ),
    (
        "I went in expecting a light comedy, but",
        "it was a warm, clever and very funny surprise.",
        "it was two hours of jokes that never land.",
    ),
    ("The lead actress", "carries every scene with real warmth.", "seems to be reading her lines off a card."),
    ("By the third act the plot", "pays off every thread it set up.", "had fallen apart completely."),
    ("The soundtrack", "is wonderful and stays with you.", "is loud, dull and everywhere."),
    ("As a sequel it", "improves on the original in every way.", "adds nothing new."),
]


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app(label_servers):
    """A labelling app of its own at /browser (so no other test's items come first)."""
    db = f"sqlite:///{label_servers['root'] / 'browser.db'}"
    deploy_label_app("browser", "/browser", FeedbackSettings(), db, ADMIN_KEY, ServeSettings(num_cpus_per_replica=0))
    store = LabelStore(db)
    yield f"http://127.0.0.1:{label_servers['urls']['port']}/browser", store
    store.close()
    delete_label_app("browser")


def _open(browser, url: str):
    from playwright.sync_api import expect

    page = browser.new_context(viewport={"width": 1100, "height": 760}).new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(url)
    expect(page.locator("#status")).to_have_text("ready")
    return page, dialogs


def _submitted(page, expect, labelled: int) -> None:
    """Wait until the label is acknowledged and the next item is shown."""
    expect(page.locator("#progress")).to_have_text(re.compile(rf"^{labelled} labelled"))
    expect(page.locator("#status")).to_have_text(re.compile(r"^saved label \d+$"))


def test_an_annotator_labels_five_with_keyboard_and_mouse_undoes_one_and_the_export_holds_four(browser, app, tmp_path):
    from playwright.sync_api import expect

    url, store = app
    rows = [{"prompt": p, "response_a": a, "response_b": b, "policy": "smollm2"} for p, a, b in REVIEWS[:5]]
    store.add_items(1, rows, [f"five-{i}" for i in range(len(rows))])
    page, dialogs = _open(browser, f"{url}/#t={store.invite('ada')}")
    assert page.url == f"{url}/"  # the token left the address bar
    expect(page.locator("#progress")).to_have_text("0 labelled · 5 left")
    shot = tmp_path / "labelling.png"
    page.keyboard.press("2")  # overall: B; then quality: B with the keyboard
    page.keyboard.press("w")
    page.screenshot(path=str(shot))
    seen = [(page.inner_text("#left"), page.inner_text("#right"))]
    page.keyboard.press("Enter")
    _submitted(page, expect, 1)
    seen.append((page.inner_text("#left"), page.inner_text("#right")))  # 2: the mouse, with a comment
    page.click("#c-overall-right")
    page.click("#c-safety-tie")
    page.fill("#comment", "B is kinder")
    page.click("#submit")
    _submitted(page, expect, 2)
    seen.append((page.inner_text("#left"), page.inner_text("#right")))  # 3: keys, Enter
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    _submitted(page, expect, 3)
    seen.append((page.inner_text("#left"), page.inner_text("#right")))  # 4: mouse
    page.click("#c-overall-left")
    page.click("#submit")
    _submitted(page, expect, 4)
    fifth = (page.inner_text("#left"), page.inner_text("#right"))  # 5: keys, then undone with the mouse
    page.keyboard.press("4")
    page.keyboard.press("Enter")
    _submitted(page, expect, 5)
    expect(page.locator("#progress")).to_have_text("5 labelled · 0 left")
    expect(page.locator("#done")).to_be_visible()
    page.click("#undo")
    expect(page.locator("#status")).to_have_text("undone: label it again")
    assert (page.inner_text("#left"), page.inner_text("#right")) == fifth
    assert page.is_checked("#c-overall-bad")  # the withdrawn choice is shown again
    expect(page.locator("#progress")).to_have_text("4 labelled · 1 left")
    assert dialogs == []
    overall = [r for r in export_rows(store) if r["annotator"] == "ada" and r["criterion"] == "overall"]
    wanted = [(seen[0][1], seen[0][0], False), (seen[1][1], seen[1][0], False)]
    wanted += [(seen[2][1], seen[2][0], False), (seen[3][0], seen[3][1], False)]
    assert [(r["chosen"], r["rejected"], r["tie"]) for r in overall] == wanted
    others = [r for r in export_rows(store) if r["annotator"] == "ada" and r["criterion"] != "overall"]
    assert [(r["criterion"], r["tie"]) for r in others] == [("quality", False), ("safety", True)]
    assert others[0]["chosen"] == seen[0][1] and others[1]["comment"] == "B is kinder"
    if target := os.environ.get("ALIGNRAY_DOCS_SCREENSHOT"):
        shutil.copy(shot, target)


def test_model_text_is_inert_on_both_pages(browser, app):
    from playwright.sync_api import expect

    url, store = app
    store.add_items(2, [{"prompt": "Say hi. " + EVIL, "response_a": "hi " + EVIL, "response_b": EVIL}], ["evil"])
    page, dialogs = _open(browser, f"{url}/#t={store.invite('eve')}")
    texts = {page.inner_text("#left"), page.inner_text("#right")}
    assert texts == {"hi " + EVIL, EVIL} and page.inner_text("#prompt") == "Say hi. " + EVIL
    assert page.locator("#prompt *, #left *, #right *").count() == 0  # shown as text: no element was made
    admin, admin_dialogs = browser.new_page(), []
    admin.on("dialog", lambda d: (admin_dialogs.append(d.message), d.dismiss()))
    admin.goto(f"{url}/admin#t={ADMIN_KEY}")
    expect(admin.locator("#items tbody tr").first).to_contain_text("Say hi.")
    assert admin.locator("#items tbody pre").first.inner_text() == "Say hi. " + EVIL
    assert admin.locator("#items img, #items script, #items b").count() == 0
    page.wait_for_timeout(300)
    assert dialogs == [] and admin_dialogs == []


def _attacker(target: str) -> http.server.ThreadingHTTPServer:
    """A page on another origin that posts a form and fires no-cors fetches at the app."""
    html = f"""<!doctype html><body><iframe name=sink></iframe>
<form id=f method=POST target=sink action="{target}/api/undo"><input name=x value=1></form>
<script>
fetch("{target}/api/undo", {{method: "POST", mode: "no-cors", body: "{{}}"}});
fetch("{target}/api/undo", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "application/json"}},
  body: "{{}}"}});
document.getElementById("f").submit();
</script></body>""".encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_an_attacker_page_cannot_undo_a_label(browser, app):
    from playwright.sync_api import expect

    url, store = app
    store.add_items(3, [{"prompt": "p", "response_a": "good", "response_b": "bad", "policy": "x"}], ["csrf"])
    page, _ = _open(browser, f"{url}/#t={store.invite('victim')}")
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    _submitted(page, expect, 1)
    before = [r for r in export_rows(store) if r["annotator"] == "victim"]
    server = _attacker(url)
    try:
        for host in ("localhost", "127.0.0.1"):  # another site, and the same site on another port
            attack = page.context.new_page()  # the victim's browser profile, token in its storage
            attack.goto(f"http://{host}:{server.server_address[1]}/")
            attack.wait_for_timeout(800)
            attack.close()
    finally:
        server.shutdown()
    assert [r for r in export_rows(store) if r["annotator"] == "victim"] == before and len(before) == 1
