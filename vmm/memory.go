package vmm

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// guestMemory is guest RAM: a memfd mapped shared. Pages the guest never wrote stay holes of
// the file, which cost no host memory and are found without touching them (SEEK_DATA), so a
// migration neither reads nor sends nor stores them; a destination punches a hole where the
// source had zero pages instead of writing zeros.
type guestMemory struct {
	fd  int
	mem []byte
}

func newGuestMemory(size uint64) (*guestMemory, error) {
	fd, err := unix.MemfdCreate("migvisor-guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("vmm: guest memory: memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vmm: guest memory of %d bytes: %w", size, err)
	}
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vmm: guest memory of %d bytes: %w", size, err)
	}
	return &guestMemory{fd: fd, mem: mem}, nil
}

func (g *guestMemory) close() error {
	return errors.Join(unix.Munmap(g.mem), unix.Close(g.fd))
}

// populated sets in dst (one bit per page) every page that may hold data: the file's data
// extents. A page left clear is a hole, all zero. An error sets every bit.
func (g *guestMemory) populated(dst []uint64) {
	size := int64(len(g.mem))
	off := int64(0)
	for off < size {
		start, err := unix.Seek(g.fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return // no data from off to the end
		}
		if err != nil {
			setBits(dst, 0, uint64(size/PageSize))
			return
		}
		end, err := unix.Seek(g.fd, start, unix.SEEK_HOLE)
		if err != nil {
			end = size
		}
		setBits(dst, uint64(start/PageSize), uint64((end+PageSize-1)/PageSize))
		off = end
	}
}

// discard makes pages [first, first+count) zero and gives their host memory back. Only the
// data extents in the range are punched: punching a hole where there is one already still
// walks the range, which for the holes of a large idle guest cost more than all the rest of
// its migration.
func (g *guestMemory) discard(first, count uint64) error {
	off, end := int64(first*PageSize), int64((first+count)*PageSize)
	for off < end {
		start, err := unix.Seek(g.fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) || (err == nil && start >= end) {
			return nil
		}
		if err != nil {
			start = off // cannot tell: punch the rest
		}
		stop, err := unix.Seek(g.fd, start, unix.SEEK_HOLE)
		if err != nil || stop > end {
			stop = end
		}
		if err := unix.Fallocate(g.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, start, stop-start); err != nil {
			return fmt.Errorf("vmm: discarding guest pages %d+%d: %w", first, count, err)
		}
		off = stop
	}
	return nil
}

// setBits sets bits [lo, hi) of bm.
func setBits(bm []uint64, lo, hi uint64) {
	for p := lo; p < hi; {
		if p%64 == 0 && hi-p >= 64 {
			bm[p/64] = ^uint64(0)
			p += 64
			continue
		}
		bm[p/64] |= 1 << (p % 64)
		p++
	}
}
