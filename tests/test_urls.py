"""memescale.ingest.urls: image URLs of real and constructed records, post metadata, image ids."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import shared_path

from memescale.ingest.urls import (
    BadRecord,
    ImageRef,
    extract_image_refs,
    image_id,
    image_urls,
    parse_created_utc,
)

# Every record of shared/data/reddit/submissions_sample.ndjson, inspected by hand.
SAMPLE_EXPECTED = {
    "1afwvv8": [],  # self post
    "1afwvv9": [],  # crosspost of a v.redd.it video (its preview is a video frame)
    "1afwvva": ["https://i.redd.it/lkx6ajtx6vfc1.jpeg"],  # i.redd.it image, over_18
    "1afwvvb": [],  # self post
    "1afwvve": ["https://i.redd.it/0s99ddox6vfc1.jpeg"],  # i.redd.it image
    "1afwvvf": [],  # self post (game thread) with a preview of a linked article
    "1afwvvg": [],  # self post, deleted later
    "1afwvvh": [],  # link to a reddit comments page
    "1afwvvi": [],  # redgifs video (rich:video), preview is a video frame
    "1afwvvj": [],  # self post
    "87": [],  # 2005 link to a website root
    "88": [],  # wsj .html article, preview is the article thumbnail
    "89": [],  # paulgraham.com .html essay
    "90": [],  # macrumors .shtml article
    "91": [],  # wired .html article
    "1v3sg": [],  # nola.com article (&amp; in the URL)
    "1v3sk": [],  # blog post
    "1v3st": [],  # typepad .html
    "1v3su": [],  # eweek .asp
    "1v3t1": [],  # blogspot .html
    "2f4i96": [],  # spam .php page, created_utc as a string
    "2f4i97": [],  # boston.com .html article
    "2f4i98": [],  # self post
    "2f4i99": [],  # spam .php page
    "2f4i9a": [],  # link to a subreddit
    "j08bcm": [],  # self post
    "jk3lbh": [],  # self post with inline images (media_metadata): self posts are skipped
    "jwl1gg": [],  # self post
    "jyc1pb": [],  # self post
    "jzzw6o": [],  # self post with a link preview
    "abdn5a": [],  # self post
}


def sample_records() -> list[dict]:
    path = shared_path("reddit", "submissions_sample.ndjson")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_image_urls_match_hand_checked_table():
    records = sample_records()
    assert [r["id"] for r in records] == list(SAMPLE_EXPECTED)
    got = {r["id"]: [ref.url for ref in extract_image_refs(r)] for r in records}
    assert got == SAMPLE_EXPECTED


def test_sample_image_ref_carries_post_metadata():
    record = next(r for r in sample_records() if r["id"] == "1afwvva")
    (ref,) = extract_image_refs(record)
    assert ref == ImageRef(
        post_id="1afwvva",
        image_index=0,
        url="https://i.redd.it/lkx6ajtx6vfc1.jpeg",
        subreddit="jerkbuds012924",
        title=record["title"],
        author="Turbulent_Camera6286",
        created_utc=1706745600,
        score=1,
        over_18=True,
        permalink="https://www.reddit.com/r/jerkbuds012924/comments/1afwvva/dm_me_for_more/",
    )
    assert ref.image_id == image_id("1afwvva", 0)


def test_sample_created_utc_variants_all_parse():
    kinds = {type(r["created_utc"]) for r in sample_records()}
    assert kinds == {int, float, str}
    for r in sample_records():
        assert isinstance(parse_created_utc(r["created_utc"]), int)


# --- constructed records ---------------------------------------------------------------------


def post(url: str = "https://example.com/page", **fields) -> dict:
    return {"id": "abc", "url": url, "created_utc": 1600000000, "subreddit": "memes", **fields}


def media(mid: str, status: str = "valid", kind: str = "Image", ext: str = "jpg") -> dict:
    if kind == "AnimatedImage":
        source = {"gif": f"https://i.redd.it/{mid}.gif", "mp4": f"https://v/{mid}.mp4"}
    else:
        source = {"u": f"https://preview.redd.it/{mid}.{ext}?width=640&amp;format=pjpg&amp;s=z"}
    return {"status": status, "e": kind, "m": f"image/{ext}", "s": source, "id": mid}


def gallery(ids: list[str], metadata: dict) -> dict:
    return {
        "is_gallery": True,
        "url": "https://www.reddit.com/gallery/abc",
        "gallery_data": {"items": [{"media_id": i, "id": n} for n, i in enumerate(ids)]},
        "media_metadata": metadata,
    }


def preview(*urls: str) -> dict:
    return {"images": [{"source": {"url": u, "width": 1, "height": 1}, "resolutions": []} for u in urls]}


def test_gallery_every_valid_item_in_gallery_order():
    meta = {
        "m1": media("m1"),
        "m2": media("m2", status="failed"),
        "m3": media("m3", ext="png"),
        "m4": media("m4", kind="AnimatedImage"),
        "m5": {"status": "unprocessed", "e": "Image"},
        "m6": {"e": "Image", "s": {"u": "https://preview.redd.it/m6.jpg"}},  # no status
    }
    record = post(**gallery(["m3", "m1", "m2", "missing", "m4", "m5", "m6", "m1"], meta))
    refs = extract_image_refs(record)
    assert [r.url for r in refs] == [
        "https://preview.redd.it/m3.png?width=640&format=pjpg&s=z",
        "https://preview.redd.it/m1.jpg?width=640&format=pjpg&s=z",
        "https://i.redd.it/m4.gif",
    ]
    assert [r.image_index for r in refs] == [0, 1, 2]
    assert len({r.image_id for r in refs}) == 3


def test_gallery_of_a_crosspost_comes_from_its_parent():
    parent = post(**gallery(["a", "b"], {"a": media("a"), "b": media("b")}))
    record = post(
        url="https://www.reddit.com/gallery/parent1",
        crosspost_parent_list=[parent],
        id="xpost",
        title="crossposted",
    )
    refs = extract_image_refs(record)
    assert [r.url.split("?")[0] for r in refs] == ["https://preview.redd.it/a.jpg", "https://preview.redd.it/b.jpg"]
    assert {r.post_id for r in refs} == {"xpost"} and {r.title for r in refs} == {"crossposted"}


def test_crosspost_of_an_image_uses_its_own_link():
    record = post(url="https://i.redd.it/own.png", crosspost_parent_list=[post(url="https://i.redd.it/x.png")])
    assert image_urls(record) == ["https://i.redd.it/own.png"]


def test_removed_gallery_without_data_has_no_images():
    record = post(url="https://www.reddit.com/gallery/abc", is_gallery=True, gallery_data=None, media_metadata=None)
    assert image_urls(record) == []


@pytest.mark.parametrize(
    "url, want",
    [
        ("https://i.redd.it/abc.jpg", ["https://i.redd.it/abc.jpg"]),
        ("https://i.redd.it/abc.gif", ["https://i.redd.it/abc.gif"]),
        ("https://i.imgur.com/AbCdEfG.png", ["https://i.imgur.com/AbCdEfG.png"]),
        ("http://i.imgur.com/AbCdEfG", ["https://i.imgur.com/AbCdEfG.jpg"]),
        ("https://imgur.com/AbCdEfG", ["https://i.imgur.com/AbCdEfG.jpg"]),
        ("http://www.imgur.com/AbCdE/", ["https://i.imgur.com/AbCdE.jpg"]),
        ("https://m.imgur.com/AbCdEfG", ["https://i.imgur.com/AbCdEfG.jpg"]),
        ("https://imgur.com/AbCdEfG.JPG", ["https://i.imgur.com/AbCdEfG.jpg"]),
        ("https://imgur.com/a/AbCdE", []),
        ("https://imgur.com/gallery/AbCdE", []),
        ("https://i.imgur.com/AbCdEfG.gifv", []),
        ("https://i.imgur.com/AbCdEfG.mp4", []),
        ("https://preview.redd.it/xyz.png?width=960&amp;format=png&amp;auto=webp&amp;s=1",
         ["https://preview.redd.it/xyz.png?width=960&format=png&auto=webp&s=1"]),
        ("https://preview.redd.it/xyz.gif?width=960&amp;format=mp4&amp;s=1", []),
        ("https://example.com/cat.JPEG?size=large", ["https://example.com/cat.JPEG?size=large"]),
        ("https://example.com/a.webp", ["https://example.com/a.webp"]),
        ("https://example.com/clip.mp4", []),
        ("https://example.com/index.php?img=cat.jpg", []),
        ("https://v.redd.it/abc123", []),
        ("https://www.youtube.com/watch?v=x", []),
        ("https://youtu.be/x", []),
        ("https://www.redgifs.com/watch/x", []),
        ("https://thumbs.gfycat.com/Thing.gif", []),
        ("https://www.reddit.com/r/pics/comments/abc/title/", []),
        ("https://old.reddit.com/r/pics/", []),
        ("https://www.reddit.com/media?url=https%3A%2F%2Fi.redd.it%2Fwrapped.jpg", ["https://i.redd.it/wrapped.jpg"]),
        ("ftp://example.com/a.jpg", []),
        ("/r/pics/comments/abc/", []),
        ("http://[::1/broken.jpg", []),
        ("", []),
    ],
)
def test_direct_links(url, want):
    assert image_urls(post(url=url)) == want


def test_url_overridden_by_dest_wins_over_url():
    record = post(url="https://www.reddit.com/r/x/comments/abc/", url_overridden_by_dest="https://i.redd.it/d.png")
    assert image_urls(record) == ["https://i.redd.it/d.png"]


def test_self_posts_have_no_images_even_with_media():
    record = post(url="https://i.redd.it/x.jpg", is_self=True, preview=preview("https://preview.redd.it/x.jpg"))
    assert image_urls(record) == []


@pytest.mark.parametrize(
    "url, hint, want_preview",
    [
        ("https://example.com/photo-page", "image", True),  # Reddit says image: preview is it
        ("https://imgur.com/a/AbCdE", None, True),  # imgur album: image page host
        ("https://www.flickr.com/photos/x/1", "link", True),
        ("https://www.reddit.com/gallery/abc", None, True),  # a gallery link without gallery data
        ("https://example.com/news/story", "link", False),  # article thumbnail
        ("https://example.com/news/story", None, False),
        ("https://v.redd.it/abc", "hosted:video", False),  # video frame
        ("https://www.redgifs.com/watch/x", "image", False),
        ("https://example.com/story.html", "image", False),  # obvious HTML page
    ],
)
def test_preview_fallback_only_for_image_like_links(url, hint, want_preview):
    source = "https://external-preview.redd.it/p.jpg?auto=webp&amp;s=42"
    record = post(url=url, post_hint=hint, preview=preview(source, source))
    assert image_urls(record) == (["https://external-preview.redd.it/p.jpg?auto=webp&s=42"] if want_preview else [])


def test_preview_of_a_crosspost_parent_is_used_when_own_is_missing():
    parent = post(preview=preview("https://preview.redd.it/parent.jpg"))
    record = post(url="https://imgur.com/a/AbCdE", crosspost_parent_list=[parent])
    assert image_urls(record) == ["https://preview.redd.it/parent.jpg"]


@pytest.mark.parametrize(
    "garbage",
    [
        {"gallery_data": {"items": [None, 3, {"media_id": ["x"]}]}, "media_metadata": {"x": 1}},
        {"gallery_data": [], "media_metadata": []},
        {"preview": {"images": [None, {"source": None}, {"source": {"url": 5}}]}},
        {"crosspost_parent_list": [None]},
        {"url": None},
        {"url": 12},
    ],
)
def test_malformed_media_fields_never_raise(garbage):
    record = post(url="https://www.reddit.com/gallery/abc", is_gallery=True, post_hint="image")
    record.update(garbage)
    assert image_urls(record) == []


# --- post metadata ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, want",
    [(1409529600, 1409529600), (1706745600.0, 1706745600), (1706745600.9, 1706745600),
     ("1409529600", 1409529600), (" 1409529600 ", 1409529600), ("1409529600.5", 1409529600),
     ("1.4e9", 1400000000), (0, 0)],
)
def test_created_utc_parses(value, want):
    (ref,) = extract_image_refs(post(url="https://i.redd.it/a.jpg", created_utc=value))
    assert ref.created_utc == want and type(ref.created_utc) is int


@pytest.mark.parametrize(
    "value", [None, "", "yesterday", True, float("nan"), float("inf"), -5, "1e400", [1], 2**64]
)
def test_unparseable_created_utc_is_a_bad_record(value):
    with pytest.raises(BadRecord):
        extract_image_refs(post(url="https://i.redd.it/a.jpg", created_utc=value))
    assert issubclass(BadRecord, ValueError)


def test_bad_created_utc_without_images_is_not_an_error():
    assert extract_image_refs(post(url="https://example.com/", created_utc="garbage")) == []


def test_missing_id_with_images_is_a_bad_record():
    record = post(url="https://i.redd.it/a.jpg")
    del record["id"]
    with pytest.raises(BadRecord):
        extract_image_refs(record)


@pytest.mark.parametrize(
    "fields, want",
    [
        ({}, (0, False, "", "")),
        ({"score": "17", "over_18": "true", "author": "[deleted]", "title": None}, (17, True, "[deleted]", "")),
        ({"score": 3.0, "over_18": 1, "author": None, "title": "t"}, (3, True, "", "t")),
        ({"score": None, "over_18": "false"}, (0, False, "", "")),
        ({"score": True, "over_18": None}, (0, False, "", "")),
    ],
)
def test_score_over_18_author_title_defaults(fields, want):
    (ref,) = extract_image_refs({"id": "abc", "url": "https://i.redd.it/a.jpg", "created_utc": 1, **fields})
    assert (ref.score, ref.over_18, ref.author, ref.title) == want


@pytest.mark.parametrize(
    "permalink, subreddit, want",
    [
        ("/r/pics/comments/abc/t/", "pics", "https://www.reddit.com/r/pics/comments/abc/t/"),
        ("http://www.reddit.com/r/pics/comments/abc/t/", "pics", "https://www.reddit.com/r/pics/comments/abc/t/"),
        (None, "pics", "https://www.reddit.com/r/pics/comments/abc/"),
        ("", None, "https://www.reddit.com/comments/abc/"),
    ],
)
def test_permalink_is_absolute(permalink, subreddit, want):
    record = {"id": "abc", "url": "https://i.redd.it/a.jpg", "created_utc": 1,
              "permalink": permalink, "subreddit": subreddit}
    (ref,) = extract_image_refs(record)
    assert ref.permalink == want


def test_duplicate_urls_within_a_post_are_merged():
    meta = {"a": media("a"), "b": media("a")}  # two items, the same image URL
    assert len(image_urls(post(**gallery(["a", "b", "a"], meta)))) == 1


# --- image ids -------------------------------------------------------------------------------


def test_image_id_is_stable_63_bit_and_distinct():
    digest = hashlib.blake2b(b"1afwvva:0", digest_size=8).digest()
    assert image_id("1afwvva", 0) == int.from_bytes(digest, "little") & (2**63 - 1)
    ids = {image_id(f"post{p}", i) for p in range(300) for i in range(20)}
    assert len(ids) == 6000 and all(0 <= x < 2**63 for x in ids)
    assert image_id("ab", 12) != image_id("ab1", 2)
