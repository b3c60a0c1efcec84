from vmreplica._internal.cli.main import entry_point

entry_point()
