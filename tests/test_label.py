"""The labelling tool (memescale/quality/label_app.py): its API on a live aiohttp server, the pair choice
(random share, active selection by ensemble disagreement, background retraining), the CLI's
import/export/error semantics, and the page in headless Debian Chromium (Playwright driving
/usr/bin/chromium): keyboard and button labels land in SQLite, a pair whose three channels are
labelled is followed by the next one, and an HTML title renders as inert text."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import requests
from aiohttp import web
from conftest import chromium_browser

from memescale.config import CurateConfig
from memescale.quality.label_app import Labeller, PairChooser, load_pool, main, make_app, pair_key
from memescale.quality.labels import LabelStore
from memescale.shards.store import ChunkResult, ShardStore, read_shards
from memescale.testing.sample_data import ImageServer, write_vector_shards
from memescale.testing.sample_index import XSS_TITLE, random_unit_vectors, write_images

DIM, N = 16, 40
RATER = "anna"


# -- fixtures ---------------------------------------------------------------------------------
def write_pool(folder: Path, urls: list[str], titles: list[str], seed: int = 3) -> np.ndarray:
    """Shards of len(urls) random vectors whose image ids are beyond 2**53 (a JS number would
    round them); returns the ids."""
    n = len(urls)
    write_vector_shards(folder, random_unit_vectors(n, DIM, seed).astype(np.float16))
    table = read_shards(str(folder))
    ids = np.int64(2**62) + np.arange(n, dtype=np.int64) * 1_000_003 + 7
    for name, values, typ in (("image_id", ids, pa.int64()), ("url", urls, pa.string()), ("title", titles, pa.string())):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, typ))
    ShardStore(str(folder)).write_chunk(ChunkResult(dump="RS_test.zst", index=0, first_line=0, lines=n), table)
    return ids


class LiveServer:
    """`with LiveServer(app) as srv:` serves an aiohttp app on a free loopback port at srv.url
    from an event loop in a thread."""

    def __init__(self, app: web.Application):
        self.app, self.loop = app, asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        self.runner = web.AppRunner(self.app, access_log=None)
        self._call(self.runner.setup())
        self._call(web.TCPSite(self.runner, "127.0.0.1", 0).start())
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label")
    write_images(tmp / "img", 8)
    with ImageServer(tmp) as images:
        ids = write_pool(tmp / "shards", [f"{images.base_url}/img/{i % 8}.png" for i in range(N)],
                         [f"post {i}" for i in range(N)])
        xss_ids = write_pool(tmp / "xss", [f"{images.base_url}/img/0.png", f"{images.base_url}/img/missing.png"],
                             [XSS_TITLE, "plain title"], seed=4)
        yield SimpleNamespace(dir=str(tmp / "shards"), ids=ids, xss_dir=str(tmp / "xss"), xss_ids=xss_ids)


def live(shards: str, db: Path, **cfg) -> LiveServer:
    heads_out = cfg.pop("heads_out", None)
    lab = Labeller(load_pool(shards), LabelStore(db), CurateConfig(**cfg), rater=RATER, heads_out=heads_out)
    srv = LiveServer(make_app(lab))
    srv.labeller, srv.db = lab, db
    return srv


@pytest.fixture
def server(data, tmp_path):
    with live(data.dir, tmp_path / "labels.sqlite") as srv:
        yield srv


def stored(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT left, right, channel, grade, rater, source FROM labels ORDER BY created").fetchall()


def post(srv: LiveServer, body) -> requests.Response:
    return requests.post(srv.url + "/api/label", data=body if isinstance(body, (str, bytes)) else json.dumps(body),
                         headers={"Content-Type": "application/json"}, timeout=10)


def get_pair(srv: LiveServer) -> dict:
    r = requests.get(srv.url + "/api/pair", timeout=10)
    assert r.status_code == 200
    return r.json()


# -- API --------------------------------------------------------------------------------------
def test_pair_shape_and_int64_ids_as_strings(server, data):
    pair = get_pair(server)
    assert set(pair) == {"left", "right", "source", "rater", "labelled_count", "total_count"}
    assert (pair["source"], pair["rater"], pair["labelled_count"], pair["total_count"]) == ("random", RATER, 0, 0)
    for side in ("left", "right"):
        card = pair[side]
        assert set(card) == {"image_id", "url", "title", "subreddit", "permalink"}
        assert isinstance(card["image_id"], str) and int(card["image_id"]) in set(data.ids.tolist())
        assert int(card["image_id"]) > 2**53 and float(card["image_id"]) != int(card["image_id"])  # a double would round it
        row = int(card["image_id"]) - data.ids[0]
        assert card["title"] == f"post {row // 1_000_003}" and card["url"].startswith("http://127.0.0.1:")
        assert card["permalink"].startswith("https://www.reddit.com/r/memes/")
    assert pair["left"]["image_id"] != pair["right"]["image_id"]


def test_label_is_stored_exactly(server, data):
    pair = get_pair(server)
    left, right = pair["left"]["image_id"], pair["right"]["image_id"]
    r = post(server, {"left": left, "right": right, "channel": "meme", "label": "left_much_better"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["labelled_count"], body["total_count"]) == (1, 1)
    assert body["stored"]["left"] == left and body["stored"]["label"] == "left_much_better"
    assert stored(server.db) == [(int(left), int(right), "meme", 2, RATER, "random")]
    # integer ids are accepted too; a second label of the channel replaces the first
    assert post(server, {"left": int(left), "right": int(right), "channel": "meme", "label": "right_better"}).ok
    assert post(server, {"left": int(left), "right": int(right), "channel": "useful", "label": "equal"}).ok
    assert stored(server.db) == [(int(left), int(right), "meme", -1, RATER, "random"),
                                 (int(left), int(right), "useful", 0, RATER, "random")]
    # a pair the server never offered is stored as "manual"
    a, b = (str(i) for i in data.ids[[0, 1]])
    if {a, b} == {left, right}:
        a = str(data.ids[2])
    assert post(server, {"left": a, "right": b, "channel": "aesthetic", "label": "left_better"}).json()["labelled_count"] == 3
    assert stored(server.db)[-1] == (int(a), int(b), "aesthetic", 1, RATER, "manual")


def test_bad_input_is_a_400_with_a_json_error(server, data):
    a, b = str(data.ids[0]), str(data.ids[1])
    ok = {"left": a, "right": b, "channel": "meme", "label": "equal"}
    bad = [dict(ok, left="12345"), dict(ok, right=a), dict(ok, channel="nsfw"), dict(ok, channel=["meme"]),
           dict(ok, label="better"), dict(ok, label=1), dict(ok, left=1.5), dict(ok, left=True),
           dict(ok, left="1e3"), dict(ok, left="9" * 30), dict(ok, left=2**70), {k: v for k, v in ok.items() if k != "right"},
           [ok], "{not json", b"\xff\xfe"]
    for body in bad:
        r = post(server, body)
        assert r.status_code == 400 and r.json()["error"], (body, r.status_code, r.text)
    r = post(server, dict(ok, pad="x" * 5000))
    assert r.status_code == 413 and "bytes" in r.json()["error"]
    assert stored(server.db) == []
    assert post(server, ok).ok


def test_export_import_round_trip(server, data, tmp_path):
    for k, (channel, label) in enumerate([("meme", "left_better"), ("aesthetic", "right_much_better"), ("useful", "equal")]):
        assert post(server, {"left": str(data.ids[k]), "right": str(data.ids[k + 5]), "channel": channel, "label": label}).ok
    r = requests.get(server.url + "/api/export", timeout=10)
    assert r.status_code == 200 and "attachment" in r.headers["Content-Disposition"]
    (tmp_path / "web.jsonl").write_bytes(r.content)
    store = server.labeller.store
    store.export_jsonl(tmp_path / "store.jsonl")
    assert r.content == (tmp_path / "store.jsonl").read_bytes()  # one format
    copy = LabelStore(tmp_path / "copy.sqlite")
    assert copy.import_jsonl(tmp_path / "web.jsonl") == 3
    assert copy.labels() == store.labels()


# -- pair choice ------------------------------------------------------------------------------
class FakeHeads:
    """disagreement = |(left - right) . w|, every call recorded."""

    def __init__(self):
        self.w = np.random.default_rng(9).standard_normal(DIM)
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def disagreement(self, emb_left, emb_right):
        score = np.abs((emb_left - emb_right) @ self.w)
        self.calls.append((emb_left, emb_right, score))
        return score


def test_random_share_in_a_seeded_run(data):
    pool = load_pool(data.dir)
    cfg = CurateConfig(label_random_share=0.25, label_candidates=8)

    def run(seed: int) -> list:
        chooser = PairChooser(pool, cfg, seed, heads=FakeHeads())
        return [chooser.next() for _ in range(2000)]

    pairs = run(5)
    share = np.mean([p.source == "random" for p in pairs])
    assert abs(share - 0.25) < 0.03, share
    assert all(p.left != p.right for p in pairs)
    assert run(5) == pairs  # seeded
    no_model = PairChooser(pool, cfg, 5)
    assert {no_model.next().source for _ in range(50)} == {"random"}


def test_active_choice_is_the_most_disputed_unlabelled_candidate(data):
    pool = load_pool(data.dir)
    cfg = CurateConfig(label_random_share=0.0, label_candidates=64)
    row_of = {pool.emb[k].astype(np.float32).tobytes(): k for k in range(len(pool))}

    def candidates(heads: FakeHeads) -> list[tuple[int, int, float]]:
        left, right, score = heads.calls[-1]
        return [(row_of[a.tobytes()], row_of[b.tobytes()], s) for a, b, s in zip(left, right, score)]

    heads = FakeHeads()
    pair = PairChooser(pool, cfg, seed=1, heads=heads).next()
    cands = candidates(heads)
    assert pair.source == "active" and len(cands) == 64
    assert (pair.left, pair.right) == max(cands, key=lambda c: c[2])[:2]

    # the same candidates with that pair labelled (in the other order): the best of the rest
    taken = pair_key(int(pool.ids[pair.right]), int(pool.ids[pair.left]))
    heads = FakeHeads()
    second = PairChooser(pool, cfg, seed=1, labelled={taken}, heads=heads).next()
    rest = [c for c in candidates(heads) if pair_key(int(pool.ids[c[0]]), int(pool.ids[c[1]])) != taken]
    assert (second.left, second.right) == max(rest, key=lambda c: c[2])[:2]
    assert pair_key(int(pool.ids[second.left]), int(pool.ids[second.right])) != taken


def test_background_retrain_switches_to_active_pairs(data, tmp_path):
    pytest.importorskip("memescale.quality.heads")
    from memescale.quality.heads import QualityHeads

    heads_out = tmp_path / "heads.safetensors"
    cfg = dict(label_retrain_every=4, label_random_share=0.0, label_candidates=32, heads_members=2,
               heads_hidden=8, heads_max_epochs=15, heads_patience=3, heads_out=str(heads_out))
    with live(data.dir, tmp_path / "labels.sqlite", **cfg) as srv:
        for _ in range(3):
            pair = get_pair(srv)
            assert pair["source"] == "random"  # no model before 2 x 4 labels
            for channel, label in (("meme", "left_better"), ("aesthetic", "equal"), ("useful", "right_better")):
                assert post(srv, {"left": pair["left"]["image_id"], "right": pair["right"]["image_id"],
                                  "channel": channel, "label": label}).ok
        deadline = time.monotonic() + 60
        while srv.labeller.chooser.heads is None and time.monotonic() < deadline:
            assert get_pair(srv)  # the server answers while it trains
            time.sleep(0.2)
        assert srv.labeller.chooser.heads is not None, "no retrain within 60 s"
        assert get_pair(srv)["source"] == "active"
    heads = QualityHeads.load(heads_out, dim=DIM)
    assert heads.members == 2 and set(heads.quantiles) == {"meme", "aesthetic", "useful"}


# -- CLI --------------------------------------------------------------------------------------
def test_cli_export_import_and_errors(data, tmp_path, capsys, monkeypatch):
    root = logging.getLogger()  # main() adds a JSON handler on the captured stderr: undo it after
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    db = tmp_path / "a.sqlite"
    store = LabelStore(db)
    lab = Labeller(load_pool(data.dir), store, CurateConfig(), rater=RATER)
    lab.record(lab.parse({"left": str(data.ids[3]), "right": str(data.ids[4]), "channel": "meme", "label": "left_better"}))
    # --export alone: write and exit, no data needed
    assert main(["--db", str(db), "--export", str(tmp_path / "a.jsonl")]) == 0
    # --import then --export into another store
    assert main(["--db", str(tmp_path / "b.sqlite"), "--import", str(tmp_path / "a.jsonl"),
                 "--export", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text() != ""
    assert LabelStore(tmp_path / "b.sqlite").labels() == store.labels()

    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"left": 1, "right": 2, "channel": "meme", "label": "nope"}\n')
    cases = [(["--data", str(tmp_path / "nope")], "does not exist"),
             (["--data", str(tmp_path / "empty")], "no embedding shards"),
             (["--data", data.dir, "--pool", "1"], "--pool"),
             (["--data", data.dir, "--set", "curate.label_candidates=x"], "label_candidates"),
             (["--data", data.dir, "--import", str(tmp_path / "bad.jsonl")], "bad.jsonl:1")]
    for args, message in cases:
        assert main(["--db", str(tmp_path / "c.sqlite"), *args]) == 2, args
        err = capsys.readouterr().err
        assert "error: " in err and message in err, (args, err)
    assert main(["--data", data.dir, "--db", str(tmp_path)]) == 2  # a folder is no database
    assert "error: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--db", str(db)])  # serving needs --data
    assert e.value.code == 2


# -- the page in Chromium ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    with chromium_browser() as b:
        yield b


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 800})  # the page's CSP enforced
    pg = context.new_page()
    pg.dialogs, pg.problems = [], []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.on("console", lambda m: pg.problems.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.problems.append(str(e)))
    yield pg
    context.close()


def shown_pair(page) -> tuple[int, int]:
    return int(page.get_attribute("#left", "data-id")), int(page.get_attribute("#right", "data-id"))


@pytest.mark.slow
def test_keys_and_buttons_label_the_pair_then_the_next_comes(page, server):
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-pairs='1']")
    keys = page.locator("#controls kbd").all_inner_texts()
    assert keys == list("12345qwertasdfg")  # the shortcuts are on the page
    left, right = shown_pair(page)
    page.wait_for_selector("#left .frame img")
    assert page.locator("#left .frame img").evaluate("img => img.complete && img.naturalWidth") > 0

    page.keyboard.press("1")  # meme: left much better
    page.wait_for_selector("button[data-channel=meme][data-label=left_much_better].chosen")
    assert stored(server.db) == [(left, right, "meme", 2, RATER, "random")]
    assert page.inner_text("#count").startswith("1 label by anna")
    assert "Saved meme: left much better" in page.inner_text("#status")

    page.keyboard.press("w")  # aesthetic: left better
    page.wait_for_selector("button[data-channel=aesthetic][data-label=left_better].chosen")
    page.click("button[data-channel=useful][data-label=right_much_better]")  # the last channel, by mouse
    page.wait_for_selector("body[data-pairs='2']")
    assert stored(server.db) == [(left, right, "meme", 2, RATER, "random"), (left, right, "aesthetic", 1, RATER, "random"),
                                 (left, right, "useful", -2, RATER, "random")]
    assert pair_key(*shown_pair(page)) != pair_key(left, right)
    assert page.locator("#controls button.chosen").count() == 0

    page.keyboard.press("n")  # skip
    page.wait_for_selector("body[data-pairs='3']")
    page.keyboard.press("Space")
    page.wait_for_selector("body[data-pairs='4']")
    assert len(stored(server.db)) == 3
    assert not page.problems and not page.dialogs


@pytest.mark.slow
def test_html_title_is_inert_and_a_broken_image_is_a_placeholder(page, data, tmp_path):
    with live(data.xss_dir, tmp_path / "labels.sqlite") as srv:
        page.goto(srv.url + "/")
        page.wait_for_selector("body[data-pairs='1']")
        page.wait_for_selector(".placeholder")
        titles = page.locator("figcaption .title")
        assert sorted(titles.all_inner_texts()) == sorted([XSS_TITLE, "plain title"])  # shown as text
        xss = titles.filter(has_text="onerror")
        assert "&lt;img" in xss.inner_html()
        assert page.locator("img[src='x']").count() == 0  # no element was created from it
        broken = page.locator(".side", has=page.locator(".placeholder"))
        assert broken.get_attribute("data-id") == str(data.xss_ids[1])
        assert broken.locator(".placeholder").inner_text() == "image unavailable"
        assert broken.locator("img").count() == 0
        boxes = [page.locator(f"#{side} .frame").bounding_box() for side in ("left", "right")]
        assert boxes[0]["height"] == boxes[1]["height"] >= 200  # the layout holds
        page.wait_for_timeout(300)
        assert not page.dialogs
        # the 404 image is the page's only console error
        assert all("404" in p for p in page.problems), page.problems


def test_pool_sample_reads_only_the_rows_asked(tmp_path):
    """--pool N: a seeded sample of N rows (the same for a seed), read without the whole corpus."""
    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float16)
    write_vector_shards(tmp_path, x, per_file=700)
    a, b, c = load_pool(str(tmp_path), 50, seed=1), load_pool(str(tmp_path), 50, seed=1), load_pool(str(tmp_path), 50, seed=2)
    assert len(a) == 50 and a.emb.shape == (50, 16) and np.array_equal(a.ids, b.ids)
    assert not np.array_equal(a.ids, c.ids)
    rows = a.ids - 10**12
    assert np.array_equal(a.emb, x[rows])  # each sampled id carries its own embedding
