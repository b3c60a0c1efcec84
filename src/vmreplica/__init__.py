"""vmreplica: disaster-recovery replication of QEMU/KVM virtual machines.

The public surface is small: :mod:`vmreplica.client` (the SDK the CLI itself uses) and
:mod:`vmreplica.errors`. Everything else lives in :mod:`vmreplica._internal` and may change.
"""

__version__ = "0.1.0"
