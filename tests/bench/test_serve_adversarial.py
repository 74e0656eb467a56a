"""`slimlm bench serve --abusive-share`: the adversarial mix against a real server process (tiny
model). Normal clients must see no failure while abusive ones get 4xx, and the KV pool must be
empty at the end."""

from __future__ import annotations

from slimlm.bench import serve_load
from slimlm.cli import build_parser


def test_the_option_reaches_the_scenario():
    a = build_parser().parse_args(["bench", "serve", "--clients", "4", "--abusive-share", "0.1"])
    assert a.abusive_share == 0.1


def test_adversarial_mix_fails_no_normal_request(tiny_llama_dir):
    r = serve_load.run(str(tiny_llama_dir), clients=4, seconds=3, max_tokens=8, threads=1, abusive_share=0.25,
                       windows=1, engine_args=["--kv-cache-bytes", str(8 << 20)], log=lambda *_: None)
    assert r["clean"]["completed"] > 0 and r["mixed"]["completed"] > 0
    assert r["failed"] == 0 and r["incomplete"] == 0
    a = r["abusive"]
    assert a["sent"] > 0 and a.get("4xx", 0) > 0 and not a["errors"], a
    assert r["kv_blocks_used_at_end"] == 0
    assert r["rss_before_bytes"] and r["rss_after_bytes"]
    table = serve_load.table(r)
    assert "TTFT p99 mixed / clean" in table and "KV blocks in use at the end: 0" in table
