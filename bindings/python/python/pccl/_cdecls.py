"""PCCL 1.0's cffi cdecls module; not part of this package (PCCL-rs calls its Rust core directly)."""

raise ImportError(
    "pccl._cdecls was an internal module of PCCL 1.0's cffi binding and does not exist in this pccl package "
    "(PCCL-rs); use the public API: `import pccl` / `from pccl import Communicator, MasterNode, ...`"
)
