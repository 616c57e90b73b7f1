"""`alignray label invite | export | stats` on the store directly (no server needed)."""

from __future__ import annotations

import re

from cluster.cli import main
from cluster.config import load_config
from cluster.labelling import open_store
from envs.data import load_preferences


def test_invite_export_and_stats(tmp_path, capsys):
    run = [f"run.output_dir={tmp_path / 'run'}", "serve.port=8123"]
    assert main(["label", "invite", "ada", "tiny", *run]) == 0
    link = capsys.readouterr().out.strip()
    assert re.fullmatch(r"http://127\.0\.0\.1:8123/label/#t=[A-Za-z0-9_-]{32}", link)
    assert main(["label", "invite", "boss", "tiny", *run, "--admin"]) == 0
    assert "/label/admin#t=" in capsys.readouterr().out

    assert main(["label", "export", str(tmp_path / "none.parquet"), "tiny", *run]) == 2
    assert "holds no labels yet" in capsys.readouterr().err

    store = open_store(load_config("tiny", run))
    ada = store.authenticate(link.split("#t=")[1])
    store.add_items(1, [{"prompt": "p", "response_a": "good", "response_b": "bad", "policy": "tiny"}], ["k"])
    store.submit(ada.id, store.claim(ada.id).slot_id, {"overall": "tie", "quality": "left"}, comment="close")
    store.close()
    assert main(["label", "export", str(tmp_path / "out.parquet"), "tiny", *run]) == 0
    rows = load_preferences(tmp_path / "out.parquet", None)
    assert [(r["criterion"], r["tie"], r["annotator"]) for r in rows] == [
        ("overall", True, "ada"),
        ("quality", False, "ada"),
    ]

    assert main(["label", "stats", "tiny", *run]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ada\s+annotator\s+1\s+1\s+0$", out, re.M) and "slots: 1 labelled" in out

    assert main(["label", "invite"]) == 2
    assert "needs a NAME" in capsys.readouterr().err
