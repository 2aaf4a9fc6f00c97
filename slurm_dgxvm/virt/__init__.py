"""What talks to libvirt and QEMU: :mod:`.hypervisor` (the connection, dgxvm's NAT network and
its reservations, domains) and :mod:`.guest` (readiness through the guest agent, the serial
console's tail). Nothing is imported here: ``import slurm_dgxvm.virt`` loads no libvirt."""
