"""The paper's studies as commands: perturbation tests (Sec. 4.1) and relation decoding (Sec. 4.2)."""

from tl_tensorlens.studies import perturbation, relations

__all__ = ["perturbation", "relations"]
