"""What every tokenizer of ours shares: it is opened from one file and pickled as that path
(data-loader workers reopen the file instead of copying the model)."""

from __future__ import annotations


class PathBackedTokenizer:
    path: str
    vocab_size: int

    def __len__(self) -> int:
        return self.vocab_size

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"
