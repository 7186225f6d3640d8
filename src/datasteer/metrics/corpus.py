"""Real English text that ships with every Python: for tests and benchmarks of the metrics.

`real_texts(n)` cuts texts of varied length (one to eight consecutive paragraphs) from the
Python language reference (`pydoc_data.topics`) and the docstrings of standard-library
modules. It is prose written by people, not generated gibberish, and needs no download.
"""

from __future__ import annotations

import importlib
import inspect
import random
import warnings
from functools import lru_cache

_MODULES = ("builtins", "os", "os.path", "collections", "itertools", "functools", "re", "json", "pathlib", "typing",
            "argparse", "logging", "subprocess", "asyncio", "email.message", "http.client", "urllib.parse",
            "unittest", "decimal", "fractions", "statistics", "datetime", "inspect", "string", "textwrap",
            "threading", "socket", "shutil", "tempfile", "csv", "sqlite3", "zipfile", "tarfile", "heapq", "bisect",
            "contextlib", "dataclasses", "enum", "abc", "io", "pickle", "copy", "random", "math", "cmath", "time",
            "calendar", "locale", "gettext", "codecs", "difflib", "pprint", "traceback", "warnings", "weakref",
            "queue", "sched", "select", "signal", "struct", "array", "hashlib", "hmac", "secrets", "uuid", "base64",
            "binascii", "html", "xml.etree.ElementTree", "configparser", "getopt", "glob", "fnmatch", "linecache",
            "operator", "numbers", "types", "ast", "dis", "tokenize", "pdb", "timeit", "trace", "gc", "sys",
            "platform", "ctypes", "concurrent.futures", "multiprocessing", "ipaddress", "smtplib", "imaplib",
            "ftplib", "mailbox", "mimetypes", "wave", "colorsys", "zlib", "gzip", "bz2", "lzma", "shelve", "dbm")


@lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """Every prose paragraph of at least three words, in a fixed order."""
    import pydoc_data.topics

    seen: set[str] = set()
    out: list[str] = []

    def add(text: str | None) -> None:
        if not isinstance(text, str):
            return
        for para in inspect.cleandoc(text).split("\n\n"):
            para = para.strip()
            if len(para.split()) >= 3 and para not in seen:
                seen.add(para)
                out.append(para)

    for key in sorted(pydoc_data.topics.topics):
        add(pydoc_data.topics.topics[key])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io ...) warn on attribute access
        for name in _MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            add(module.__doc__)
            for attr in sorted(vars(module)):
                if not attr.startswith("_"):
                    add(getattr(getattr(module, attr, None), "__doc__", None))
    return tuple(out)


def real_texts(n: int, seed: int = 0) -> list[str]:
    """`n` texts, each one to eight consecutive paragraphs (seeded, so the same `n` and seed give the same texts)."""
    pool = paragraphs()
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        start = rng.randrange(len(pool))
        texts.append("\n\n".join(pool[start:start + rng.choice((1, 1, 2, 3, 5, 8))]))
    return texts
