"""The page in headless Debian Chromium (Playwright driving /usr/bin/chromium; no browser is
downloaded): search, a slider, infinite scroll, click-to-search, shareable URLs, and that an
HTML title renders as inert text."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest
from conftest import chromium_browser, free_port, require_chromium, start_local_ray

from memescale.testing.sample_data import ImageServer
from memescale.testing.sample_index import XSS_ROW, XSS_TITLE, build_sample_index, sample_corpus, write_images

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

K = 12


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    require_chromium()
    import ray

    from serve import app as serve_app

    tmp = tmp_path_factory.mktemp("serve-page")
    write_images(tmp / "img", 64)
    with ImageServer(tmp) as images:
        x, md = sample_corpus(300, 64, seed=1, image_base_url=f"{images.base_url}/img")
        build_sample_index(tmp / "index", x, md)
        start_local_ray()
        try:
            yield serve_app.start(tmp / "index", "configs/tiny.toml", "127.0.0.1", free_port(), overrides=[
                f"serve.default_k={K}", f'serve.telemetry_path="{tmp / "telemetry.jsonl"}"'])
        finally:
            serve_app.stop()
            ray.shutdown()


@pytest.fixture(scope="module")
def browser(base_url):
    with chromium_browser() as b:
        yield b


@pytest.fixture
def page(browser):
    # bypass_csp: the page's CSP forbids eval, which Playwright's wait_for_function needs; it
    # also means the XSS check below relies on escaping alone, not on the CSP.
    context = browser.new_context(viewport={"width": 1200, "height": 800}, bypass_csp=True)
    pg = context.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.searches = []
    pg.on("request", lambda r: pg.searches.append(r.post_data_json) if r.url.endswith("/api/search") else None)
    yield pg
    context.close()


def open_page(page, url):
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)


def query_of(page) -> dict:
    return {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}


def test_type_query_slider_second_page_and_click(page, base_url):
    open_page(page, base_url + "/")
    page.fill("#q", "cat meme")
    page.press("#q", "Enter")
    page.wait_for_selector(".card", timeout=30_000)
    assert page.locator(".card").count() >= K
    assert query_of(page)["q"] == "cat meme"  # shareable state
    assert page.locator(".card img").first.get_attribute("loading") == "lazy"
    assert "Results for" in page.inner_text("#status")

    # A slider: the change re-runs the search with the weight, and the URL records it.
    page.click("#toggle-options")
    assert page.locator("#weights input[type=range]").count() == 4
    with page.expect_response(lambda r: r.url.endswith("/api/search")
                              and (r.request.post_data_json or {}).get("weights", {}).get("recency") == 2) as resp:
        page.eval_on_selector("#w-recency", "el => { el.value = '2'; el.dispatchEvent(new Event('input')); "
                                            "el.dispatchEvent(new Event('change')); }")
    assert resp.value.status == 200
    page.wait_for_function("document.querySelector('output[for=w-recency]').textContent === '2.0'")
    assert query_of(page)["w.recency"] == "2"

    # Infinite scroll: reaching the bottom loads the next page with the cursor.
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for_function(f"document.querySelectorAll('.card').length > {K}", timeout=30_000)
    paged = [b for b in page.searches if b and b.get("cursor")]
    assert paged and paged[-1]["weights"] == {"recency": 2}
    ids = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")
    assert len(ids) == len(set(ids))

    # Click a result: search by its image.
    first = page.locator(".card").nth(3)
    clicked = first.get_attribute("data-id")
    image_id = first.get_attribute("data-image-id")
    assert image_id and image_id.isdigit()
    first.locator(".frame").click()
    page.wait_for_function(f"new URLSearchParams(location.search).get('like') === '{image_id}'")
    page.wait_for_function(f"document.querySelector('.card') && document.querySelector('.card').dataset.id === '{clicked}'",
                           timeout=30_000)
    assert page.searches[-1]["like"] == image_id
    assert not page.dialogs


def test_shared_url_restores_the_search(page, base_url):
    open_page(page, base_url + "/?q=monday+coffee&w.meme=-1.5&dedup=0")
    page.wait_for_selector(".card", timeout=30_000)
    assert page.input_value("#q") == "monday coffee"
    assert page.input_value("#w-meme") == "-1.5"
    assert not page.is_checked("#dedup")
    body = page.searches[0]
    assert body["text"] == "monday coffee" and body["weights"] == {"meme": -1.5} and body["dedup"] is False


def test_subreddit_exclusion_and_minimum_score_filters(page, base_url):
    open_page(page, base_url + "/?q=monday+coffee&xsub=memes,funny&score=25000")
    page.wait_for_selector(".card", timeout=30_000)
    assert page.input_value("#exclude-subreddits") == "memes, funny"
    assert page.input_value("#min-score") == "25000"
    body = page.searches[0]
    assert body["filters"]["exclude_subreddits"] == ["memes", "funny"] and body["filters"]["min_score"] == 25000
    subs = page.eval_on_selector_all(".card .sub", "cs => cs.map(c => c.textContent.split(' ')[0])")
    assert subs and not {"r/memes", "r/funny"} & set(subs)
    # changing the field searches again and keeps it in the URL
    page.eval_on_selector("#min-score", "e => { e.value = '40000'; e.dispatchEvent(new Event('change')); }")
    page.wait_for_function("new URLSearchParams(location.search).get('score') === '40000'")
    page.wait_for_function("document.querySelectorAll('.card').length > 0")
    assert page.searches[-1]["filters"]["min_score"] == 40000


def test_infinite_scroll_under_a_subreddit_filter_runs_until_the_matches_do(page, base_url):
    # the fixture's 300 records: every 6th is r/pics, 50 in all, none NSFW; pages of K = 12
    open_page(page, base_url + "/?q=cat&sub=pics")
    page.wait_for_selector(".card", timeout=30_000)
    for _ in range(10):
        if page.evaluate("document.getElementById('more').hidden"):
            break
        n = page.locator(".card").count()
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_function(f"document.querySelectorAll('.card').length > {n} "
                               "|| document.getElementById('more').hidden", timeout=30_000)
    ids = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")
    subs = page.eval_on_selector_all(".card .sub", "cs => cs.map(c => c.textContent.split(' ')[0])")
    assert len(ids) == len(set(ids)) and 45 <= len(ids) <= 50 and set(subs) == {"r/pics"}  # dedup may drop a few
    bodies = [b for b in page.searches if b]
    assert len(bodies) == 5 and all(b["filters"]["subreddits"] == ["pics"] for b in bodies)  # 4 full pages + the rest


def test_two_terms_with_a_negative_one_move_the_results_away_from_it(page, base_url):
    import requests

    def ranked(body: dict) -> list[str]:
        r = requests.post(base_url + "/api/search", json=dict(body, k=300, dedup=False), timeout=60)
        assert r.status_code == 200, r.text
        return [str(res["id"]) for res in r.json()["results"]]

    dog_rank = {i: n for n, i in enumerate(ranked({"text": "dog"}))}
    open_page(page, base_url + "/?q=cat&dedup=0")
    page.wait_for_selector(".card", timeout=30_000)
    assert not page.is_visible("#query-image")  # only image queries show a query image
    alone = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")  # one page (in column order)
    assert len(alone) == K

    page.click("#add-term")
    page.fill("#terms .term-text", "dog")
    page.fill("#terms .term-weight", "-1")
    assert page.is_visible("#q-weight")
    page.press("#terms .term-text", "Enter")
    page.wait_for_function("new URLSearchParams(location.search).getAll('t').join() === '-1:dog'")
    page.wait_for_function(f"document.querySelectorAll('.card').length && !Array.from(document.querySelectorAll('.card'))"
                           f".every(c => {alone!r}.includes(c.dataset.id))", timeout=30_000)
    body = page.searches[-1]
    assert body["terms"] == [{"text": "cat", "weight": 1}, {"text": "dog", "weight": -1}] and "text" not in body
    away = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")
    assert sorted(away) == sorted(ranked({"terms": body["terms"]})[:K])  # the page shows what the API ranks
    # the results moved away from "dog": they sit far lower in its ranking than "cat"'s own
    mean_rank = lambda ids: sum(dog_rank[i] for i in ids) / len(ids)  # noqa: E731
    assert mean_rank(away) > mean_rank(alone) + 30, (mean_rank(away), mean_rank(alone))
    assert "− \"dog\"" in page.inner_text("#status")

    # the URL restores the terms; removing the term searches by the text alone again
    open_page(page, page.url)
    page.wait_for_selector(".card", timeout=30_000)
    assert page.input_value("#terms .term-text") == "dog" and page.input_value("#terms .term-weight") == "-1"
    assert page.searches[-1]["terms"][1] == {"text": "dog", "weight": -1}
    page.click("#terms .term-remove")
    page.wait_for_function("!new URLSearchParams(location.search).has('t')")
    assert page.searches[-1]["text"] == "cat" and not page.is_visible("#q-weight")


def test_html_in_titles_is_inert(page, base_url):
    xss_image = sample_corpus(300, 64, seed=1)[1][XSS_ROW]["image_id"]  # the fixture's corpus
    open_page(page, f"{base_url}/?like={xss_image}")
    page.wait_for_selector(f".card[data-id='{XSS_ROW}']", timeout=30_000)
    card = page.locator(f".card[data-id='{XSS_ROW}']")
    assert card.locator(".title").inner_text() == XSS_TITLE  # shown as text
    assert "&lt;img" in card.locator(".title").inner_html()
    assert page.locator("img[src='x']").count() == 0  # no element was created from it
    page.wait_for_timeout(300)
    assert not page.dialogs


def test_upload_an_image(page, base_url, tmp_path):
    from PIL import Image

    Image.new("RGB", (90, 60), (20, 160, 90)).save(tmp_path / "q.png")
    open_page(page, base_url + "/")
    page.click("#toggle-options")
    page.set_input_files("#upload", str(tmp_path / "q.png"))
    page.wait_for_selector(".card", timeout=30_000)
    assert "image" in page.searches[-1] and len(page.searches[-1]["image"]) > 100
    assert page.is_visible("#query-thumb")
    assert "q.png" in page.inner_text("#status")


def test_bad_input_shows_the_servers_message(page, base_url):
    open_page(page, base_url + "/")
    page.fill("#q", "meme " * 90)
    page.press("#q", "Enter")
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "tokens long" in page.inner_text("#status")


def test_page_runs_under_its_csp_and_honours_telemetry_opt_out(browser, base_url):
    context = browser.new_context(viewport={"width": 1000, "height": 700})  # CSP enforced
    pg = context.new_page()
    problems, posts = [], []
    pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    try:
        open_page(pg, base_url + "/")
        pg.fill("#q", "weekend pizza")
        pg.press("#q", "Enter")
        pg.wait_for_selector(".card")
        pg.wait_for_load_state("networkidle")
        assert any(u.endswith("/api/telemetry") for u in posts)  # on by default
        pg.uncheck("#telemetry")
        posts.clear()
        pg.fill("#q", "friday deploy")
        pg.press("#q", "Enter")
        pg.wait_for_selector(".card")
        pg.wait_for_load_state("networkidle")
        assert any(u.endswith("/api/search") for u in posts)
        assert not any(u.endswith("/api/telemetry") for u in posts)
        assert not [p for p in problems if "Content Security Policy" in p or "Uncaught" in p], problems
    finally:
        context.close()
