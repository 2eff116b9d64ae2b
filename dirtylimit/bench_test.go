package dirtylimit

import (
	"testing"
)

// BenchmarkRingFull is the hook's cost on a vCPU's thread when it decides not to sleep: the
// vCPU is not limited, or it is slower than its quota.
func BenchmarkRingFull(b *testing.B) {
	for _, tc := range []struct {
		name    string
		alg     Algorithm
		limited bool
	}{
		{"not limited", Migvisor, false},
		{"migvisor under quota", Migvisor, true},
		{"qemu no penalty", QEMU, true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			m := newFakeMachine(2, 4096)
			l := NewLimiter(m, Options{Algorithm: tc.alg})
			defer l.Close()
			if tc.limited {
				i := int64(0)
				if err := l.Set(&i, 1<<40); err != nil {
					b.Fatal(err)
				}
			}
			for b.Loop() {
				m.dirty(0, 4096)
				l.RingFull(0)
			}
		})
	}
}
