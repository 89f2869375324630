"""txengine: every data write a reversible, replicated revision."""

from .exceptions import TxEngineError
from .peer import Finding, OperationResult, Peer, RevisionDetail, RevisionInfo, VerifyReport

__all__ = [
    "Finding",
    "OperationResult",
    "Peer",
    "RevisionDetail",
    "RevisionInfo",
    "TxEngineError",
    "VerifyReport",
]
__version__ = "0.1.0"
