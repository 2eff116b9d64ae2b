// Command migvisor is the virtual machine monitor: it parses QEMU-style options, builds the
// machine (vmm), the dirty limit (dirtylimit) and migration (migration), serves them over QMP
// (qmp, schema) exactly as QEMU 10 would, and runs until `quit` or SIGINT/SIGTERM.
//
//	migvisor -accel kvm,dirty-ring-size=4096 -smp 2 -m 1G \
//	    -workload cpus=0,mode=write -workload cpus=1,mode=read \
//	    -qmp unix:/tmp/m.sock,server=on,wait=off
//
// The QMP handlers live here, one file per area (qmp_machine.go, qmp_probe.go for the QOM
// tree, CPU model and absent features that libvirt's probe asks about, qmp_dirtylimit.go,
// qmp_migration.go): each decodes its validated arguments, calls one method of the package that
// owns the behaviour and shapes the reply.
package main
