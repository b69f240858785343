"""Real text that ships with the machine, as (source id, title, text) documents.

* man pages (``/usr/share/man/man[1-8]``, gzip-compressed roff): rendered to plain text by
  a small roff stripper (macros dropped, font escapes removed, section headings kept). The
  NAME section is returned separately (``ManPage.description``) so that benchmarks can use
  the one-line description as a query whose answer is the rest of that page.
* ``/usr/share/doc/**``: README/NEWS/*.txt/*.md/*.rst style text files (gzip or plain);
  changelogs and copyright files are skipped (repetitive, licence boilerplate).
* ``pydoc_data.topics``: the Python reference manual sections every CPython installs.

Everything is deterministic: sorted file lists, no randomness.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

MAN_DIR = "/usr/share/man"
DOC_DIR = "/usr/share/doc"


@dataclass
class Document:
    source: str  # stable id, e.g. "man:ls.1", "doc:bash/README", "pydoc:for"
    text: str
    title: str = ""


@dataclass
class ManPage:
    source: str
    names: str  # "gzip, gunzip, zcat"
    description: str  # "compress or expand files" ("" when the page has no NAME line)
    body: str  # the page without its NAME section


def read_text_file(path: str) -> str:
    """Text of ``path``; ``.gz`` files are decompressed. Undecodable bytes are replaced."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------- roff
_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes \fB \f(CW \f[B]
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes \s-1
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # string registers \*(lq
    (re.compile(r"\\n(\[[^\]]*\]|\(..|.)"), ""),  # number registers
    (re.compile(r"\\[kwhvlLbDoXZ]'[^']*'"), ""),  # drawing / width escapes
]
_NAMED = {
    "em": "-",
    "en": "-",
    "hy": "-",
    "mi": "-",
    "aq": "'",
    "oq": "'",
    "cq": "'",
    "lq": '"',
    "rq": '"',
    "dq": '"',
    "bu": "*",
    "co": "(c)",
    "rg": "(R)",
    "tm": "(TM)",
    "<=": "<=",
    ">=": ">=",
    "!=": "!=",
    "->": "->",
    "<-": "<-",
    "mu": "x",
    "ti": "~",
    "ha": "^",
    "ga": "`",
    "rs": "\\",
    "ba": "|",
    "br": "|",
    "sl": "/",
    "pl": "+",
    "eq": "=",
    "sq": "*",
    "de": "deg",
    "fo": "<",
    "fc": ">",
}
_NAMED_RE = re.compile(r"\\(\(..|\[[^\]]*\])")
_SIMPLE = {
    "\\-": "-",
    "\\e": "\\",
    "\\&": "",
    "\\ ": " ",
    "\\~": " ",
    "\\|": "",
    "\\^": "",
    "\\%": "",
    "\\c": "",
    "\\0": " ",
    "\\:": "",
    "\\'": "'",
    "\\`": "`",
    "\\.": ".",
    "\\,": "",
    "\\/": "",
    "\\)": "",
}
_SIMPLE_RE = re.compile(r"\\[-e& ~|^%c0:'`.,/)]")
_BREAK_MACROS = {
    "PP",
    "LP",
    "P",
    "sp",
    "HP",
    "RS",
    "RE",
    "IP",
    "TP",
    "TQ",
    "br",
    "nf",
    "fi",
    "EX",
    "EE",
    "SY",
    "YS",
    "in",
    "ti",
    "ne",
    "ad",
    "na",
    "UE",
    "ME",
    "Vb",
    "Ve",
}
_FONT_MACROS = {
    "B",
    "I",
    "R",
    "SM",
    "SB",
    "BR",
    "RB",
    "IR",
    "RI",
    "BI",
    "IB",
    "OP",
    "UR",
    "MT",
    "Nm",
    "Nd",
    "Ar",
    "Fl",
    "Op",
    "Pa",
    "Xr",
    "Cm",
    "Ic",
    "Em",
    "Sy",
    "Dv",
    "Er",
    "Ev",
    "Fn",
    "Fa",
    "Ft",
    "Va",
    "Li",
    "Ql",
    "Dq",
    "Sq",
    "Pq",
    "Ss",
    "It",
}


def _unescape(s: str) -> str:
    for pat, rep in _ESCAPES:
        s = pat.sub(rep, s)
    s = _NAMED_RE.sub(lambda m: _NAMED.get(m.group(1).strip("([]"), ""), s)
    s = _SIMPLE_RE.sub(lambda m: _SIMPLE[m.group(0)], s)
    return s.replace("\\\\", "\\").replace("\\", "")


def _macro_args(rest: str) -> list[str]:
    out, cur, quoted = [], [], False
    for ch in rest:
        if ch == '"':
            quoted = not quoted
        elif ch in " \t" and not quoted:
            if cur:
                out.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


_MDOC_INLINE = {
    "Fl",
    "Ar",
    "Op",
    "Oo",
    "Oc",
    "Ns",
    "Pa",
    "Xr",
    "Cm",
    "Ic",
    "Em",
    "Sy",
    "Dv",
    "Er",
    "Ev",
    "Fn",
    "Fa",
    "Ft",
    "Va",
    "Li",
    "Ql",
    "Dq",
    "Sq",
    "Pq",
    "Nm",
    "No",
    "Bro",
    "Brc",
    "Aq",
    "Po",
    "Pc",
    "Qo",
    "Qc",
    "Dl",
    "Ek",
    "Bk",
    "It",
    "Ss",
    "Ta",
    "Cd",
    "Ad",
    "An",
    "Lk",
    "Mt",
    "Tn",
    "Ux",
    "At",
    "Bx",
    "Ox",
    "Nx",
    "Fx",
    "Dx",
}


def _mdoc_inline(tokens: list[str]) -> list[str]:
    """mdoc arguments with callable macro names dropped (``Fl x`` -> ``-x``)."""
    out, flag = [], False
    for t in tokens:
        if t in _MDOC_INLINE:
            flag = t == "Fl"
            continue
        out.append("-" + t if flag else t)
        flag = False
    return out


def roff_to_text(src: str) -> list[tuple[str, str]]:
    """Render roff source to ``[(section heading, text), ...]`` (heading "" before the first
    .SH). Good enough for man(7)/mdoc(7)/pod2man pages; not a typesetter."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    lines = []
    for raw in src.replace("\r\n", "\n").split("\n"):  # join "\"-continued lines
        if lines and lines[-1].endswith("\\") and not lines[-1].endswith("\\\\"):
            lines[-1] = lines[-1][:-1] + raw
        else:
            lines.append(raw)
    i, n = 0, len(lines)
    pending_tag = False
    mdoc_name = ""
    while i < n:
        line = lines[i]
        i += 1
        if line.startswith(('.\\"', "'\\\"", ".\\#")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")) and len(line) > 1:
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            macro, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            if macro in ("de", "de1", "am", "ig"):  # macro definition / ignore block
                end = ".." if macro != "ig" or not rest.strip() else "." + rest.strip()
                while i < n and lines[i].strip() != end:
                    i += 1
                i += 1
                continue
            if macro in ("if", "ie", "el") or macro.startswith(("if", "ie", "el")):
                if "\\{" in line:  # skip the whole conditional block
                    depth = line.count("\\{") - line.count("\\}")
                    while i < n and depth > 0:
                        depth += lines[i].count("\\{") - lines[i].count("\\}")
                        i += 1
                continue
            if macro in ("SH", "Sh", "SS"):
                head = _unescape(" ".join(_macro_args(rest))).strip()
                if not head and i < n:  # heading on the next line
                    head = _unescape(lines[i]).strip()
                    i += 1
                if macro == "SS":
                    sections[-1][1].append("\n" + head + "\n")
                else:
                    sections.append((head.upper(), []))
                continue
            if macro in ("TP", "TQ"):
                pending_tag = True
                sections[-1][1].append("\n")
                continue
            if macro == "IP":
                args = _macro_args(rest)
                sections[-1][1].append("\n" + (_unescape(args[0]) + " " if args else ""))
                continue
            if macro in _BREAK_MACROS:
                sections[-1][1].append("\n")
                continue
            if macro in _FONT_MACROS:
                args = _macro_args(rest)
                if macro == "Nd":  # mdoc one-line description
                    args = ["-"] + args
                elif macro[0].isupper() and macro[1:2].islower():  # mdoc: inline macros
                    if macro == "Nm":
                        mdoc_name = mdoc_name or (args[0] if args else "")
                        args = args or [mdoc_name]
                    args = _mdoc_inline([macro] + args)
                sep = "" if len(macro) == 2 and macro.isupper() and macro not in ("SM", "SB", "OP", "UR", "MT") else " "
                text = _unescape(sep.join(args))
                if text:
                    sections[-1][1].append(text + ("\n" if pending_tag else " "))
                pending_tag = False
                continue
            continue  # any other request: dropped
        text = _unescape(line)
        sections[-1][1].append(text + ("\n" if pending_tag else " "))
        pending_tag = False
    out = []
    for head, parts in sections:
        body = "".join(parts)
        body = re.sub(r"[ \t]+", " ", body)
        body = re.sub(r" *\n *", "\n", body)
        body = re.sub(r"\n{3,}", "\n\n", body).strip()
        if head or body:
            out.append((head, body))
    return out


def parse_man_page(path: str, source: str | None = None) -> ManPage | None:
    """A man page as names/description/body; None for ``.so`` redirects and empty pages."""
    try:
        src = read_text_file(path)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    head = src.lstrip()[:200]
    if head.startswith(".so ") and src.count("\n") <= 3:
        return None
    sections = roff_to_text(src)
    names = description = ""
    body_parts = []
    for head_name, text in sections:
        if head_name in ("NAME", "NAMN", "NOM") and not names:
            line = " ".join(text.split())
            m = re.split(r"\s+[-\u2013\u2014]+\s+", line, maxsplit=1)
            names = m[0].strip()
            description = m[1].strip() if len(m) > 1 else ""
            continue
        body_parts.append(f"{head_name}\n{text}" if head_name else text)
    body = "\n\n".join(p for p in body_parts if p.strip())
    if not body.strip():
        return None
    name = os.path.basename(path)
    if name.endswith(".gz"):
        name = name[:-3]
    return ManPage(source or f"man:{name}", names, description, body)


def man_page_paths(
    man_dir: str = MAN_DIR, sections: str = "12345678", exclude: tuple[str, ...] = ("gcloud",)
) -> list[str]:
    """Sorted English man page files of the given sections; names starting with any of
    ``exclude`` are skipped (gcloud ships ~16k near-identical generated pages)."""
    out = []
    for s in sections:
        d = os.path.join(man_dir, f"man{s}")
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            if name.startswith(exclude) or os.path.islink(p) or not os.path.isfile(p):
                continue
            out.append(p)
    return out


def iter_man_pages(
    man_dir: str = MAN_DIR, sections: str = "12345678", exclude: tuple[str, ...] = ("gcloud",)
) -> Iterator[ManPage]:
    for p in man_page_paths(man_dir, sections, exclude):
        page = parse_man_page(p)
        if page is not None:
            yield page


_DOC_KEEP = re.compile(
    r"(readme|news|faq|todo|authors|thanks|howto|usage|install|notes|"
    r"\.txt|\.md|\.rst|\.text)",
    re.I,
)
_DOC_SKIP = re.compile(
    r"(changelog|copyright|\.html?|\.png|\.gif|\.svg|\.jpg|\.css|\.js|"
    r"\.pdf|\.xml|\.py|\.c|\.h|\.pl|\.sh)(\.gz)?$",
    re.I,
)


def doc_paths(doc_dir: str = DOC_DIR, max_bytes: int = 2_000_000) -> list[str]:
    out = []
    for root, dirs, files in os.walk(doc_dir):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            if os.path.islink(p) or _DOC_SKIP.search(name) or not _DOC_KEEP.search(name):
                continue
            try:
                if os.path.getsize(p) > max_bytes:
                    continue
            except OSError:
                continue
            out.append(p)
    return out


def _readable_text(path: str) -> str | None:
    """The file's text; None when it cannot be read, is binary (a NUL byte early on) or blank."""
    try:
        text = read_text_file(path)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    return None if "\x00" in text[:4096] or not text.strip() else text


def iter_doc_files(doc_dir: str = DOC_DIR) -> Iterator[Document]:
    for p in doc_paths(doc_dir):
        text = _readable_text(p)
        if text is None:
            continue
        rel = os.path.relpath(p, doc_dir)
        yield Document(f"doc:{rel[:-3] if rel.endswith('.gz') else rel}", text, rel)


def iter_pydoc_topics() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"pydoc:{name}", topics[name], name)


def iter_files(pattern: str) -> Iterator[Document]:
    """Documents from a glob (``**`` allowed); ``.gz`` decompressed, man pages rendered."""
    import glob

    for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
        if not os.path.isfile(p):
            continue
        if re.search(r"/man\d?/[^/]+\.\d\w*(\.gz)?$", p):
            page = parse_man_page(p)
            if page is not None:
                head = f"{page.names} - {page.description}\n\n" if page.names else ""
                yield Document(page.source, head + page.body, page.names)
            continue
        text = _readable_text(p)
        if text is not None:
            yield Document(f"file:{p}", text, os.path.basename(p))
