"""Virtual machines of this host: definitions (:mod:`.service`) and processes (:mod:`.runtime`)."""

from vmreplica._internal.engine.vms.runtime import VmRuntime
from vmreplica._internal.engine.vms.service import DiskRequest, VmRequest, VmService
from vmreplica._internal.store.vms import VmRecord

__all__ = ["DiskRequest", "VmRecord", "VmRequest", "VmRuntime", "VmService"]
