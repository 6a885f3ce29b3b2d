"""Image URLs of a Reddit submission record, with the post metadata every image carries.

Pure functions over one record dict (as parsed by `memescale.ingest.dumps`); no network. The rules,
in order of preference (first that yields an image wins):

1. Self posts (``is_self``) have no images.
2. The link (``url_overridden_by_dest``, else ``url``) when it is a direct image: an image
   host (i.redd.it, i.imgur.com, preview.redd.it, ...) or a path ending in
   .jpg/.jpeg/.png/.gif/.webp. A bare imgur page ``imgur.com/<id>`` becomes
   ``https://i.imgur.com/<id>.jpg``; albums (``/a/``, ``/gallery/``) are not direct images.
3. Gallery posts (``is_gallery``): every item of ``gallery_data.items`` in order, through
   ``media_metadata[media_id].s.u`` (``.s.gif`` for animated items); items whose metadata
   is missing or whose ``status`` is not ``"valid"`` are skipped.
4. ``preview.images[].source.url``, but only when the link is plausibly an image: Reddit
   tagged the post ``post_hint == "image"``, the link is a gallery, or it points at an
   image-hosting page (imgur album, flickr, ...). Previews of videos and articles are thumbnails,
   not images posted to Reddit.

Known non-images stop the search before any network traffic: v.redd.it, .gifv/.mp4, video
hosts (youtube, redgifs, gfycat, ...), reddit.com links (comments, subreddits) and HTML pages
(.html/.php/...). A crosspost uses its own link, and its parent's (``crosspost_parent_list[0]``)
gallery and preview data when it has none of its own. All URLs are HTML-unescaped (``&amp;``).
Deleted and removed posts keep their link (placeholder images are filtered after download).
"""

from __future__ import annotations

import hashlib
import html
import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp"})
VIDEO_EXTENSIONS = frozenset({".gifv", ".mp4", ".webm", ".mov", ".m4v", ".mkv", ".avi"})
PAGE_EXTENSIONS = frozenset(
    {".html", ".htm", ".shtml", ".php", ".asp", ".aspx", ".jsp", ".cgi", ".pdf"}
)
# Hosts that serve only images (a URL on them is an image whatever its path looks like).
IMAGE_HOSTS = frozenset(
    {
        "i.redd.it",
        "preview.redd.it",
        "external-preview.redd.it",
        "i.redditmedia.com",
        "i.reddituploads.com",
        "i.imgur.com",
        "pbs.twimg.com",
    }
)
# Hosts (and their subdomains) whose links are never images.
NON_IMAGE_HOSTS = frozenset(
    {
        "v.redd.it",
        "reddit.com",
        "redd.it",
        "youtube.com",
        "youtu.be",
        "redgifs.com",
        "gfycat.com",
        "streamable.com",
        "vimeo.com",
        "twitch.tv",
        "tiktok.com",
        "pornhub.com",
        "xvideos.com",
    }
)
# Pages that show images: their preview is the image (imgur albums, photo sites).
IMAGE_PAGE_HOSTS = frozenset(
    {"imgur.com", "m.imgur.com", "flickr.com", "gyazo.com", "imgflip.com", "ibb.co", "prnt.sc"}
)
IMGUR_HOSTS = frozenset({"imgur.com", "m.imgur.com", "i.imgur.com"})
# A single imgur image: /<id> or /<id>.<image extension> (albums are /a/<id>, /gallery/<id>).
_IMGUR_IMAGE = re.compile(r"/([A-Za-z0-9]{5,8})(\.(?:jpe?g|png|gif|webp))?/?", re.IGNORECASE)
INT64_MAX = (1 << 63) - 1

# Outcomes of `classify_url`.
IMAGE = "image"  # a direct image URL
GALLERY = "gallery"  # a reddit.com/gallery/<id> link
BLOCKED = "blocked"  # known not to be an image: no fallback to the preview
PAGE = "page"  # anything else: maybe an HTML page showing an image


class BadRecord(ValueError):
    """A record with images whose post fields cannot be read (no id, unparseable time)."""


def image_id(post_id: str, index: int) -> int:
    """Stable non-negative int64 naming image `index` of post `post_id`.

    The first 8 bytes (little-endian) of blake2b(f"{post_id}:{index}"), masked to 63 bits.
    """
    digest = hashlib.blake2b(f"{post_id}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & INT64_MAX


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One image of one post, with the post's metadata. `image_id` derives from the first two."""

    post_id: str
    image_index: int  # 0-based position of the image within its post
    url: str
    subreddit: str
    title: str
    author: str
    created_utc: int  # seconds since the epoch
    score: int
    over_18: bool
    permalink: str  # https://www.reddit.com/r/...
    image_id: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_id", image_id(self.post_id, self.image_index))


def extract_image_refs(record: dict) -> list[ImageRef]:
    """One `ImageRef` per distinct image URL of `record`, in post order (rules: module doc).

    Post fields are read only when the record has images; then a missing id or an
    unparseable ``created_utc`` raises BadRecord. O(size of the record's media fields).
    """
    urls = image_urls(record)
    if not urls:
        return []
    post_id = record.get("id")
    if not isinstance(post_id, str) or not post_id:
        raise BadRecord(f"record has no id: {post_id!r}")
    created = parse_created_utc(record.get("created_utc"))
    subreddit = _text(record.get("subreddit"))
    common: dict[str, Any] = dict(
        post_id=post_id,
        subreddit=subreddit,
        title=_text(record.get("title")),
        author=_text(record.get("author")),
        created_utc=created,
        score=_int_or_zero(record.get("score")),
        over_18=_flag(record.get("over_18")),
        permalink=absolute_permalink(record.get("permalink"), subreddit, post_id),
    )
    return [ImageRef(image_index=i, url=u, **common) for i, u in enumerate(urls)]


def image_urls(record: dict) -> list[str]:
    """The distinct image URLs of `record` in post order (rules: module doc). Never raises."""
    if record.get("is_self") is True:
        return []
    parents = record.get("crosspost_parent_list")
    parent = parents[0] if isinstance(parents, list) and parents else None
    parent = parent if isinstance(parent, dict) else {}
    link = record.get("url_overridden_by_dest") or record.get("url")
    kind, url = classify_url(link) if isinstance(link, str) else (BLOCKED, "")
    if kind == IMAGE:
        return [url]
    if record.get("is_gallery") is True or parent.get("is_gallery") is True:
        urls = gallery_urls(record) or gallery_urls(parent)
        if urls:
            return urls
    if kind == BLOCKED:
        return []
    if kind == GALLERY or record.get("post_hint") == "image" or _host(url) in IMAGE_PAGE_HOSTS:
        return preview_urls(record) or preview_urls(parent)
    return []


def classify_url(raw: str) -> tuple[str, str]:
    """(`IMAGE` | `GALLERY` | `BLOCKED` | `PAGE`, the unescaped, normalised URL).

    Non-http(s) URLs are BLOCKED. ``reddit.com/media?url=<image>`` is classified as the
    image it wraps; single-image imgur links are rewritten to ``https://i.imgur.com/<id>.<ext>``
    (``.jpg`` when the link has no extension). O(len(raw)).
    """
    url = html.unescape(raw).strip()
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").removeprefix("www.")
    except ValueError:
        return BLOCKED, url
    if parts.scheme not in ("http", "https") or not host:
        return BLOCKED, url
    ext = posixpath.splitext(parts.path)[1].lower()
    if ext in VIDEO_EXTENSIONS or "format=mp4" in parts.query:
        return BLOCKED, url
    imgur = _IMGUR_IMAGE.fullmatch(parts.path) if host in IMGUR_HOSTS else None
    if imgur is not None:
        return IMAGE, f"https://i.imgur.com/{imgur.group(1)}{ext if imgur.group(2) else '.jpg'}"
    if host in IMAGE_HOSTS:
        return IMAGE, url
    if _matches(host, NON_IMAGE_HOSTS):
        return _classify_non_image_host(url, host, parts.path, parts.query)
    if ext in PAGE_EXTENSIONS:
        return BLOCKED, url
    if ext in IMAGE_EXTENSIONS:
        return IMAGE, url
    return PAGE, url


def gallery_urls(post: dict) -> list[str]:
    """Distinct source URLs of the valid items of a gallery post, in gallery order."""
    data = post.get("gallery_data")
    items = data.get("items") if isinstance(data, dict) else None
    metadata = post.get("media_metadata")
    if not isinstance(items, list) or not isinstance(metadata, dict):
        return []
    urls = []
    for item in items:
        media_id = item.get("media_id") if isinstance(item, dict) else None
        media = metadata.get(media_id) if isinstance(media_id, str) else None
        if not isinstance(media, dict) or media.get("status") != "valid":
            continue
        source = media.get("s")
        url = (source.get("u") or source.get("gif")) if isinstance(source, dict) else None
        if isinstance(url, str) and url:
            urls.append(html.unescape(url))
    return _distinct(urls)


def preview_urls(post: dict) -> list[str]:
    """Distinct ``preview.images[].source.url`` of a post (http(s) only), in order."""
    preview = post.get("preview")
    images = preview.get("images") if isinstance(preview, dict) else None
    if not isinstance(images, list):
        return []
    urls = []
    for image in images:
        source = image.get("source") if isinstance(image, dict) else None
        url = source.get("url") if isinstance(source, dict) else None
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            urls.append(html.unescape(url))
    return _distinct(urls)


def parse_created_utc(value: object) -> int:
    """Seconds since the epoch from an int, a float or a numeric string; BadRecord otherwise
    (booleans, NaN, infinities and times outside [0, 2**63) included). Fractions are truncated."""
    seconds = _number(value.strip()) if isinstance(value, str) else value
    if isinstance(seconds, float) and math.isfinite(seconds):
        seconds = int(seconds)
    if type(seconds) is not int or not 0 <= seconds <= INT64_MAX:
        raise BadRecord(f"unparseable created_utc: {value!r}")
    return seconds


def absolute_permalink(permalink: object, subreddit: str, post_id: str) -> str:
    """``https://www.reddit.com`` + the record's path; built from subreddit and id if absent."""
    if isinstance(permalink, str) and permalink:
        path = urlsplit(permalink).path if permalink.startswith("http") else permalink
        if path.startswith("/"):
            return "https://www.reddit.com" + path
    prefix = f"/r/{subreddit}" if subreddit else ""
    return f"https://www.reddit.com{prefix}/comments/{post_id}/"


def _classify_non_image_host(url: str, host: str, path: str, query: str) -> tuple[str, str]:
    """Links to non-image hosts: BLOCKED, except reddit galleries and media-viewer wrappers."""
    if _matches(host, frozenset({"reddit.com"})):
        if path.startswith("/gallery/"):
            return GALLERY, url
        if path == "/media":
            inner = parse_qs(query).get("url")
            if inner:
                kind, inner_url = classify_url(inner[0])
                if kind == IMAGE:
                    return IMAGE, inner_url
    return BLOCKED, url


def _matches(host: str, domains: frozenset[str]) -> bool:
    """True if `host` is one of `domains` or a subdomain of one."""
    return any(host == d or host.endswith("." + d) for d in domains)


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").removeprefix("www.")
    except ValueError:
        return ""


def _distinct(urls: list[str]) -> list[str]:
    return list(dict.fromkeys(urls))


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _number(text: str) -> int | float | None:
    """`text` as an int if it is one, else as a float, else None."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return None


def _int_or_zero(value: object) -> int:
    """An int from an int, a finite float or a numeric string; 0 for anything else."""
    number = _number(value.strip()) if isinstance(value, str) else value
    if isinstance(number, float) and math.isfinite(number):
        return int(number)
    return number if type(number) is int else 0


def _flag(value: object) -> bool:
    """over_18 as a bool: true only for True, a non-zero number or the string "true"."""
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value) if isinstance(value, (bool, int, float)) else False
