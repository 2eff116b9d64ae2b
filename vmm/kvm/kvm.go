package kvm

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DevicePath is the KVM device.
const DevicePath = "/dev/kvm"

// ioctl issues one ioctl and names it in the error.
func ioctl(fd int, req uintptr, arg uintptr, name string) (uintptr, error) {
	return retried(req, name, func() (uintptr, unix.Errno) {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
		return r, errno
	})
}

// ioctlPtr is ioctl with a pointer argument: converted within the syscall's own argument list,
// so that it stays valid for the call.
func ioctlPtr(fd int, req uintptr, arg unsafe.Pointer, name string) (uintptr, error) {
	return retried(req, name, func() (uintptr, unix.Errno) {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
		return r, errno
	})
}

// retried issues call until it is not interrupted. A signal (the Go runtime's SIGURG, a kick
// meant for another thread) can cut a slow ioctl such as KVM_CREATE_VM short before it did
// anything: it is asked again, as QEMU does. KVM_RUN's EINTR is the kick itself and goes to
// the caller.
func retried(req uintptr, name string, call func() (uintptr, unix.Errno)) (uintptr, error) {
	for {
		r, errno := call()
		switch {
		case errno == unix.EINTR && req != ioctlRun:
			continue
		case errno != 0:
			return 0, opError(name, errno)
		}
		return r, nil
	}
}

// System is an open /dev/kvm.
type System struct {
	fd       int
	mmapSize int
}

// Open opens /dev/kvm and checks the API version.
func Open() (*System, error) {
	fd, err := unix.Open(DevicePath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: open %s: %w", ErrNoKVM, DevicePath, err)
	}
	s := &System{fd: fd}
	v, err := ioctl(fd, ioctlGetAPIVersion, 0, "KVM_GET_API_VERSION")
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("%w: %w", ErrNoKVM, err)
	}
	if v != APIVersion {
		s.Close()
		return nil, fmt.Errorf("%w: API version %d, want %d", ErrNoKVM, v, APIVersion)
	}
	n, err := ioctl(fd, ioctlGetVCPUMmapSize, 0, "KVM_GET_VCPU_MMAP_SIZE")
	if err != nil {
		s.Close()
		return nil, err
	}
	s.mmapSize = int(n)
	return s, nil
}

// Available reports whether KVM can be used here: nil when /dev/kvm opens and
// speaks API version 12, else an error wrapping ErrNoKVM that says why (for
// test skips and the soft-accelerator fallback).
func Available() error {
	s, err := Open()
	if err != nil {
		return err
	}
	return s.Close()
}

// CheckExtension returns KVM_CHECK_EXTENSION's answer for cap: 0 when absent,
// else a positive, capability-specific value (the ring's maximum bytes for the
// dirty ring capabilities).
func (s *System) CheckExtension(c Cap) (int, error) {
	r, err := ioctl(s.fd, ioctlCheckExtension, uintptr(c), "KVM_CHECK_EXTENSION")
	return int(r), err
}

// MaxVCPUs is the most vCPUs a VM can have here: KVM_CAP_MAX_VCPUS, or where the host
// does not say, KVM_CAP_NR_VCPUS, or else 4 (the KVM API's rule).
func (s *System) MaxVCPUs() (int, error) {
	for _, c := range []Cap{CapMaxVCPUs, CapNrVCPUs} {
		n, err := s.CheckExtension(c)
		if err != nil || n > 0 {
			return n, err
		}
	}
	return 4, nil
}

// VCPUMmapSize is the size of a vCPU's kvm_run mapping.
func (s *System) VCPUMmapSize() int { return s.mmapSize }

// CreateVM creates an empty VM.
func (s *System) CreateVM() (*VM, error) {
	fd, err := ioctl(s.fd, ioctlCreateVM, 0, "KVM_CREATE_VM")
	if err != nil {
		return nil, err
	}
	unix.CloseOnExec(int(fd))
	return &VM{sys: s, fd: int(fd)}, nil
}

// Close closes /dev/kvm; VMs created from it stay valid.
func (s *System) Close() error {
	if s.fd < 0 {
		return nil
	}
	err := unix.Close(s.fd)
	s.fd = -1
	return err
}
