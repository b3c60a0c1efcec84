"""The management methods: decode JSON arguments into typed values and call the engine."""

from __future__ import annotations

from typing import Any

from vmreplica._internal import validate
from vmreplica._internal.api import args as a
from vmreplica._internal.api.mgmt import Method
from vmreplica._internal.bandwidth import Schedule, parse_rate
from vmreplica._internal.engine.connect import test_connection
from vmreplica._internal.engine.server_settings import ServerChanges
from vmreplica._internal.engine.services import Services
from vmreplica._internal.engine.vms import DiskRequest, VmRequest
from vmreplica._internal.store.replications import Settings
from vmreplica.errors import InvalidArgument


def build_methods(engine: Services) -> dict[str, Method]:
    config, server, auth, vms = engine.ctx.config, engine.server, engine.auth, engine.vms
    events, replication, failover = engine.ctx.events, engine.replication, engine.failover
    primary = engine.primary

    async def host_info(args: dict[str, Any]) -> Any:
        return {"computer_name": config.name}

    async def server_get(args: dict[str, Any]) -> Any:
        return server.get()

    async def server_set(args: dict[str, Any]) -> Any:
        changes = ServerChanges(
            enabled=a.opt_bool(args, "enabled"),
            auth=a.opt_str(args, "auth"),
            kerberos_port=a.opt_int(args, "kerberos_port"),
            max_bandwidth=a.opt_str(args, "max_bandwidth"),
            bandwidth_schedule=a.opt_str(args, "bandwidth_schedule"),
            certificate_port=a.opt_int(args, "certificate_port"),
            any_server=a.opt_bool(args, "any_server"),
            storage_location=a.opt_str(args, "storage_location"),
            certificate=a.opt_str(args, "certificate"),
            key=a.opt_str(args, "key"),
            ca=a.opt_str(args, "ca"),
            monitoring_interval=a.opt_str(args, "monitoring_interval"),
            monitoring_start_time=a.opt_str(args, "monitoring_start_time"),
        )
        # On a node of a cluster, each change becomes the whole cluster's (cluster_settings.py).
        async with engine.cluster_settings.changing():
            return await server.set(changes)

    async def auth_new(args: dict[str, Any]) -> Any:
        async with engine.cluster_settings.changing():
            return auth.auth_new(
                a.req_str(args, "allowed_primary"),
                a.req_str(args, "storage_location"),
                a.req_str(args, "trust_group"),
            )

    async def auth_get(args: dict[str, Any]) -> Any:
        return auth.auth_list(a.opt_str(args, "allowed_primary"), a.opt_str(args, "trust_group"))

    async def auth_set(args: dict[str, Any]) -> Any:
        async with engine.cluster_settings.changing():
            return auth.auth_set(
                a.req_str(args, "allowed_primary"),
                a.opt_str(args, "storage_location"),
                a.opt_str(args, "trust_group"),
            )

    async def auth_remove(args: dict[str, Any]) -> Any:
        async with engine.cluster_settings.changing():
            return auth.auth_remove(
                a.opt_str(args, "allowed_primary"), a.opt_str(args, "trust_group")
            )

    async def vm_new(args: dict[str, Any]) -> Any:
        disks: list[DiskRequest] = []
        for disk in a.dict_list(args, "disks"):
            disks.append(
                DiskRequest(
                    a.opt_str(disk, "size"), a.opt_str(disk, "path"), a.opt_str(disk, "parent")
                )
            )
        req = VmRequest(
            name=a.req_str(args, "name"),
            memory=a.opt_str(args, "memory") or "256M",
            cpus=1 if (cpus := a.opt_int(args, "cpus")) is None else cpus,
            disks=tuple(disks),
            kernel=a.opt_str(args, "kernel"),
            initrd=a.opt_str(args, "initrd"),
            append=a.opt_str(args, "append"),
        )
        return await vms.new(req)

    async def vm_list(args: dict[str, Any]) -> Any:
        await vms.adopt_defined()  # domains defined with virsh since the last look
        return vms.list()

    async def vm_get(args: dict[str, Any]) -> Any:
        await vms.adopt_defined()
        return vms.get(a.req_str(args, "name"))

    async def vm_start(args: dict[str, Any]) -> Any:
        await vms.adopt_defined()
        await vms.runtime.start(a.req_str(args, "name"))
        return vms.get(a.req_str(args, "name"))

    async def vm_stop(args: dict[str, Any]) -> Any:
        timeout = a.opt_float(args, "timeout")
        if timeout is not None and not 0 < timeout <= 86400:
            raise InvalidArgument("--timeout must be from 0 to 86400 seconds")
        name = a.req_str(args, "name")
        await vms.runtime.stop(name, bool(a.opt_bool(args, "force")), timeout or 60.0)
        return vms.get(name)

    async def vm_move(args: dict[str, Any]) -> Any:
        timeout = a.opt_float(args, "timeout")
        if timeout is not None and not 0 < timeout <= 86400:
            raise InvalidArgument("--timeout must be from 0 to 86400 seconds")
        return await primary.move.move(
            a.req_str(args, "name"), validate.fqdn(a.req_str(args, "to"), "node name"),
            bool(a.opt_bool(args, "force")), timeout or 60.0,
        )  # fmt: skip

    async def vm_remove(args: dict[str, Any]) -> Any:
        return await vms.remove(
            a.req_str(args, "name"),
            bool(a.opt_bool(args, "force")),
            bool(a.opt_bool(args, "delete_storage")),
        )

    async def vm_monitor(args: dict[str, Any]) -> Any:
        output = await vms.runtime.monitor(a.req_str(args, "name"), a.req_str(args, "command"))
        return {"output": output}

    async def event_list(args: dict[str, Any]) -> Any:
        return events.list(a.opt_str(args, "since"))

    async def replication_test_connection(args: dict[str, Any]) -> Any:
        port = a.opt_int(args, "replica_port")
        if port is None:
            raise InvalidArgument("missing --replica-port")
        return await test_connection(
            config,
            a.req_str(args, "replica_server"),
            port,
            a.opt_str(args, "auth") or "certificate",
        )

    def settings_changes(args: dict[str, Any]) -> dict[str, Any]:
        return {
            "frequency_sec": a.opt_int(args, "frequency"),
            "recovery_history": a.opt_int(args, "recovery_history"),
            "snapshot_frequency_hour": a.opt_int(args, "snapshot_frequency"),
            "compression": a.opt_bool(args, "compression"),
            "encrypt": a.opt_bool(args, "encrypt"),
            "max_bandwidth": _rate(a.opt_str(args, "max_bandwidth")),
            "bandwidth_schedule": _schedule(a.opt_str(args, "bandwidth_schedule")),
            "auto_resynchronize": a.opt_bool(args, "auto_resynchronize"),
            "auto_resync_start": _time(a.opt_str(args, "auto_resynchronize_start")),
            "auto_resync_end": _time(a.opt_str(args, "auto_resynchronize_end")),
            "recovery_point_interval": a.opt_int(args, "recovery_point_interval"),
        }

    async def replication_enable(args: dict[str, Any]) -> Any:
        if a.opt_bool(args, "as_replica"):
            seed = await engine.replica.seeds.register(
                a.req_str(args, "vm"), a.opt_str(args, "allowed_primary")
            )
            return replication.to_model(seed)
        if a.opt_str(args, "allowed_primary") is not None:
            raise InvalidArgument("--allowed-primary goes with --as-replica")
        port = a.opt_int(args, "replica_port")
        if port is None:
            raise InvalidArgument("missing --replica-port")
        changes = {k: v for k, v in settings_changes(args).items() if v is not None}
        row = await primary.enable.enable(
            a.req_str(args, "vm"),
            a.req_str(args, "replica_server"),
            port,
            a.opt_str(args, "auth") or "certificate",
            Settings(**changes),
            a.str_list(args, "exclude_disks"),
        )
        return replication.to_model(row)

    async def replication_set(args: dict[str, Any]) -> Any:
        server, port = a.opt_str(args, "replica_server"), a.opt_int(args, "replica_port")
        if a.opt_bool(args, "reverse"):
            reversed_row = await failover.reverse.reverse(a.req_str(args, "vm"), server, port)
            return replication.to_model(reversed_row)
        if server is not None or port is not None:  # else silently ignored: nothing changes
            raise InvalidArgument(
                "--replica-server and --replica-port go with --reverse: the replica of a "
                "relationship is changed by removing it and enabling it again"
            )
        row = await primary.enable.set(a.req_str(args, "vm"), settings_changes(args))
        return replication.to_model(row)

    async def replication_get(args: dict[str, Any]) -> Any:
        # wait_while (with vm): answer once the state is no longer this, or after wait_sec.
        waited, vm = a.opt_str(args, "wait_while"), a.opt_str(args, "vm")
        if waited is not None and vm is not None:
            await replication.wait_while(vm, waited, a.opt_float(args, "wait_sec") or 1.0)
        return replication.get(
            a.opt_str(args, "vm"),
            a.opt_str(args, "state"),
            a.opt_str(args, "health"),
            a.opt_str(args, "mode"),
        )

    async def replication_measure(args: dict[str, Any]) -> Any:
        return replication.measure(a.opt_str(args, "vm"))

    async def replication_cycles(args: dict[str, Any]) -> Any:
        return replication.cycles(a.req_str(args, "vm"))

    async def replication_start_initial(args: dict[str, Any]) -> Any:
        row = await primary.initial.start(
            a.req_str(args, "vm"),
            bool(a.opt_bool(args, "use_backup")),
            a.opt_str(args, "destination"),
            a.opt_str(args, "start_time"),
            bool(a.opt_bool(args, "compressed")),
        )
        return replication.to_model(row)

    async def replication_stop_initial(args: dict[str, Any]) -> Any:
        return await replication.stop_initial(a.req_str(args, "vm"))

    async def replication_import_initial(args: dict[str, Any]) -> Any:
        row = await engine.replica.media.import_media(
            a.req_str(args, "vm"), a.req_str(args, "path")
        )
        return replication.to_model(row)

    async def replication_sync(args: dict[str, Any]) -> Any:
        return replication.to_model(await primary.cycles.sync(a.req_str(args, "vm")))

    async def replication_suspend(args: dict[str, Any]) -> Any:
        return await replication.suspend(a.req_str(args, "vm"))

    async def replication_resume(args: dict[str, Any]) -> Any:
        return await replication.resume(
            a.req_str(args, "vm"),
            bool(a.opt_bool(args, "resynchronize")),
            a.opt_str(args, "start_time"),
            bool(a.opt_bool(args, "continue")),
        )

    async def replication_stop(args: dict[str, Any]) -> Any:
        return await replication.stop(a.req_str(args, "vm"))

    async def replication_remove(args: dict[str, Any]) -> Any:
        return await replication.remove(a.req_str(args, "vm"))

    async def replication_reset_statistics(args: dict[str, Any]) -> Any:
        return await replication.reset_statistics(a.req_str(args, "vm"))

    async def recovery_point_list(args: dict[str, Any]) -> Any:
        return engine.replica.points.list(vms.find(a.req_str(args, "vm")))

    async def failover_start(args: dict[str, Any]) -> Any:
        row = await failover.start(
            a.req_str(args, "vm"),
            bool(a.opt_bool(args, "prepare")),
            bool(a.opt_bool(args, "as_test")),
            a.opt_str(args, "recovery_point"),
            bool(a.opt_bool(args, "force")),
        )
        return replication.to_model(row)

    async def failover_stop(args: dict[str, Any]) -> Any:
        return replication.to_model(await failover.stop(a.req_str(args, "vm")))

    async def failover_complete(args: dict[str, Any]) -> Any:
        return replication.to_model(await failover.complete(a.req_str(args, "vm")))

    return {
        "failover.start": failover_start,
        "failover.stop": failover_stop,
        "failover.complete": failover_complete,
        "replication.enable": replication_enable,
        "replication.set": replication_set,
        "replication.get": replication_get,
        "replication.measure": replication_measure,
        "replication.cycles": replication_cycles,
        "replication.start_initial": replication_start_initial,
        "replication.stop_initial": replication_stop_initial,
        "replication.import_initial": replication_import_initial,
        "replication.sync": replication_sync,
        "replication.suspend": replication_suspend,
        "replication.resume": replication_resume,
        "replication.stop": replication_stop,
        "replication.remove": replication_remove,
        "replication.reset_statistics": replication_reset_statistics,
        "recovery_point.list": recovery_point_list,
        "host.info": host_info,
        "server.get": server_get,
        "server.set": server_set,
        "auth.new": auth_new,
        "auth.get": auth_get,
        "auth.set": auth_set,
        "auth.remove": auth_remove,
        "vm.new": vm_new,
        "vm.list": vm_list,
        "vm.get": vm_get,
        "vm.start": vm_start,
        "vm.stop": vm_stop,
        "vm.remove": vm_remove,
        "vm.move": vm_move,
        "vm.monitor": vm_monitor,
        "event.list": event_list,
        "replication.test_connection": replication_test_connection,
    }


def _time(value: str | None) -> str | None:
    return None if value is None else validate.time_of_day(value)


def _rate(value: str | None) -> int | None:
    return None if value is None else parse_rate(value)


def _schedule(value: str | None) -> str | None:
    """A schedule's text as given ("" clears one: ``replication set`` then stores None)."""
    return None if value is None else (Schedule.parse(value).text if value.strip() else "")
