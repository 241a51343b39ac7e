"""Reads a report back for the tests: tables by id, embedded images, notes and captions."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from html.parser import HTMLParser

from PIL import Image


@dataclass
class Page:
    tables: dict[str, list[list[str]]] = field(default_factory=dict)  # id -> rows (header first)
    images: list[bytes] = field(default_factory=list)  # decoded PNG payloads
    notes: dict[str, list[str]] = field(default_factory=dict)  # section id -> note texts
    captions: dict[str, list[str]] = field(default_factory=dict)  # section id -> figcaptions
    images_by_section: dict[str, int] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)  # the header's dt -> dd

    def column(self, table: str, name: str) -> list[str]:
        head, *body = self.tables[table]
        i = head.index(name)
        return [r[i] for r in body]

    def records(self, table: str) -> list[dict[str, str]]:
        head, *body = self.tables[table]
        return [dict(zip(head, r, strict=True)) for r in body]


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.page = Page()
        self.section = ""
        self.table: str | None = None
        self.row: list[str] | None = None
        self.text: list[str] | None = None  # collecting a cell, note, caption, dt or dd
        self.kind = ""
        self.last_dt = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a["id"]
            self.page.sections.append(self.section)
        elif tag == "table":
            self.table = a.get("id")
            self.page.tables[self.table] = []
        elif tag == "tr" and self.table:
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.text, self.kind = [], "cell"
        elif tag == "p" and a.get("class") == "note":
            self.text, self.kind = [], "note"
        elif tag in ("figcaption", "dt", "dd"):
            self.text, self.kind = [], tag
        elif tag == "img":
            src = a["src"]
            assert src.startswith("data:image/png;base64,"), src[:40]
            self.page.images.append(base64.b64decode(src.split(",", 1)[1], validate=True))
            n = self.page.images_by_section.get(self.section, 0)
            self.page.images_by_section[self.section] = n + 1

    def handle_data(self, data):
        if self.text is not None:
            self.text.append(data)

    def handle_endtag(self, tag):
        text = "".join(self.text or []).strip()
        if tag in ("td", "th") and self.kind == "cell":
            self.row.append(text)
        elif tag == "tr" and self.row is not None:
            self.page.tables[self.table].append(self.row)
            self.row = None
        elif tag == "table":
            self.table = None
        elif tag == "p" and self.kind == "note":
            self.page.notes.setdefault(self.section, []).append(text)
        elif tag == "figcaption":
            self.page.captions.setdefault(self.section, []).append(text)
        elif tag == "dt":
            self.last_dt = text
        elif tag == "dd":
            self.page.meta[self.last_dt] = text
        if tag in ("td", "th", "p", "figcaption", "dt", "dd"):
            self.text, self.kind = None, ""


def parse(html: str) -> Page:
    p = _Parser()
    p.feed(html)
    return p.page


def decode_png(data: bytes) -> tuple[int, int]:
    """Fully decode a PNG (not just its header); -> (width, height)."""
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        im.load()
        return im.size
