package kvm

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Error is a failed KVM operation: the ioctl (or mmap) that failed and its
// errno. errors.Is(err, unix.EINVAL) and friends see through it.
type Error struct {
	Op    string // "KVM_CREATE_VCPU", "mmap kvm_run", ...
	Errno unix.Errno
}

func (e *Error) Error() string { return e.Op + ": " + e.Errno.Error() }

// Unwrap gives the errno.
func (e *Error) Unwrap() error { return e.Errno }

func opError(op string, errno unix.Errno) error { return &Error{Op: op, Errno: errno} }

// wrapOp names op in an error from x/sys/unix (an Errno) or returns it unchanged.
func wrapOp(op string, err error) error {
	var errno unix.Errno
	if errors.As(err, &errno) {
		return opError(op, errno)
	}
	return fmt.Errorf("%s: %w", op, err)
}

// ErrNoKVM is what Available wraps when /dev/kvm cannot be used at all.
var ErrNoKVM = errors.New("kvm: /dev/kvm unusable")

// ErrRingInconsistent is wrapped by DirtyRing.Harvest when the ring holds
// something that cannot be (an unknown slot, an offset past its slot, more
// dirty entries than the ring has between two resets). The caller must treat
// all memory as dirty: dirty pages may have been lost.
var ErrRingInconsistent = errors.New("kvm: dirty ring inconsistent")

// ErrRingStuck is wrapped (with ErrRingInconsistent) by DirtyRing.Recover when
// the kernel reports the ring full but it holds nothing to collect: user space
// cannot move it on, and the vCPU will make no progress with it. Seen on
// nested PVM, whose writes to the ring are sometimes lost.
var ErrRingStuck = errors.New("kvm: dirty ring stuck full with nothing to collect")
