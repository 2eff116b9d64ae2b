package vmm

import (
	"encoding/binary"

	"github.com/migvisor/migvisor/qerr"
)

// The vCPU state blob: magic, version, accelerator, vCPU count, then per vCPU a length and the
// accelerator's bytes (KVM: kvm_regs and kvm_sregs; soft: the workload's position).
const (
	cpuStateMagic   = "MGVC"
	cpuStateVersion = 1
)

var accelCodes = map[string]byte{AccelKVM: 1, AccelSoft: 2}

// SaveCPU returns every vCPU's state. The vCPUs must be stopped (any state but running).
func (m *Machine) SaveCPU() ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.run {
		return nil, qerr.Generic(errNotPaused)
	}
	b := append([]byte(cpuStateMagic), cpuStateVersion, accelCodes[m.cfg.Accel])
	b = binary.LittleEndian.AppendUint32(b, uint32(len(m.cpus)))
	for _, c := range m.cpus {
		s, err := c.r.save()
		if err != nil {
			return nil, err
		}
		b = binary.LittleEndian.AppendUint32(b, uint32(len(s)))
		b = append(b, s...)
	}
	return b, nil
}

// LoadCPU sets every vCPU's state from a SaveCPU blob of a machine with as many vCPUs; the
// vCPUs must be stopped. State saved by the other accelerator restarts each workload at the
// progress its record in guest memory shows.
func (m *Machine) LoadCPU(b []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.run {
		return qerr.Generic(errNotPaused)
	}
	if len(b) < 10 || string(b[:4]) != cpuStateMagic || b[4] != cpuStateVersion {
		return errCPUState("not a version %d vCPU state", cpuStateVersion)
	}
	same := b[5] == accelCodes[m.cfg.Accel]
	n := binary.LittleEndian.Uint32(b[6:])
	if int(n) != len(m.cpus) {
		return errCPUState("%d vCPUs saved, this machine has %d", n, len(m.cpus))
	}
	b = b[10:]
	states := make([][]byte, n)
	for i := range states {
		if len(b) < 4 || uint64(len(b)-4) < uint64(binary.LittleEndian.Uint32(b)) {
			return errCPUState("truncated at vCPU %d", i)
		}
		l := binary.LittleEndian.Uint32(b)
		states[i], b = b[4:4+l], b[4+l:]
		if !same {
			states[i] = nil
		}
	}
	if len(b) != 0 {
		return errCPUState("%d bytes after the last vCPU", len(b))
	}
	for i, c := range m.cpus {
		if err := c.r.load(states[i]); err != nil {
			return err
		}
	}
	return nil
}
