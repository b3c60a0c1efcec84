"""The libvirt driver: the hypervisor port on libvirt's domains, checkpoints and backups."""
