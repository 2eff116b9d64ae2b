package qmp

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"sync"

	"github.com/migvisor/migvisor/qerr"
)

// QEMU's texts for descriptor passing (monitor/fds.c).
const (
	errNoFDSupplied = "No file descriptor supplied via SCM_RIGHTS"
	errFDNotFound   = "File descriptor named '%s' not found"
	errFDNotExists  = "File descriptor named '%s' has not been found"
)

// FDs is what one client passed as SCM_RIGHTS ancillary data: the descriptors that came with
// its latest message and were not claimed yet, and those it named with getfd (QEMU's
// per-monitor list). They belong to the client's session and are closed with it. Handlers
// reach it with SessionFDs.
type FDs struct {
	mu      sync.Mutex
	pending []*os.File // the last batch received, as QEMU's chardev keeps it
	named   map[string]*os.File
	closed  bool
}

type fdsKey struct{}

// SessionFDs returns the descriptor table of the client whose request ctx belongs to, nil
// outside a request (or over a transport that cannot pass descriptors, where it is empty).
func SessionFDs(ctx context.Context) *FDs {
	f, _ := ctx.Value(fdsKey{}).(*FDs)
	return f
}

// Take hands the descriptor named name to the caller, who then owns it: QEMU's
// monitor_get_fd, as migrate fd:NAME uses it.
func (f *FDs) Take(name string) (*os.File, error) {
	if f != nil {
		f.mu.Lock()
		defer f.mu.Unlock()
		if fd, ok := f.named[name]; ok {
			delete(f.named, name)
			return fd, nil
		}
	}
	return nil, qerr.Generic(errFDNotExists, name)
}

// received keeps a new batch of descriptors. As in QEMU, a batch replaces the unclaimed rest
// of the previous one, whose descriptors are closed.
func (f *FDs) received(files []*os.File) {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		closeAll(files)
		return
	}
	old := f.pending
	f.pending = files
	f.mu.Unlock()
	closeAll(old)
}

// claim takes the first descriptor of the batch (qemu_chr_fe_get_msgfd) and closes the rest.
func (f *FDs) claim() *os.File {
	f.mu.Lock()
	batch := f.pending
	f.pending = nil
	f.mu.Unlock()
	if len(batch) == 0 {
		return nil
	}
	closeAll(batch[1:])
	return batch[0]
}

// name is monitor_add_fd: a name already in use gets the new descriptor, the old one closed.
func (f *FDs) name(fdname string, fd *os.File) error {
	if isDigitName(fdname) {
		fd.Close()
		return qerr.Generic("Parameter 'fdname' expects a name not starting with a digit")
	}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		fd.Close()
		return nil
	}
	if f.named == nil {
		f.named = make(map[string]*os.File)
	}
	old := f.named[fdname]
	f.named[fdname] = fd
	f.mu.Unlock()
	if old != nil {
		old.Close()
	}
	return nil
}

func (f *FDs) closeNamed(fdname string) error {
	f.mu.Lock()
	fd, ok := f.named[fdname]
	delete(f.named, fdname)
	f.mu.Unlock()
	if !ok {
		return qerr.Generic(errFDNotFound, fdname)
	}
	return fd.Close()
}

// close ends the table with its session: every descriptor still held is closed.
func (f *FDs) close() {
	f.mu.Lock()
	f.closed = true
	files := f.pending
	for _, fd := range f.named {
		files = append(files, fd)
	}
	f.pending, f.named = nil, nil
	f.mu.Unlock()
	closeAll(files)
}

func closeAll(files []*os.File) {
	for _, fd := range files {
		fd.Close()
	}
}

// fdsets are add-fd's descriptor sets. Unlike getfd's names they belong to the whole
// server, as in QEMU, and live until remove-fd (or the server's end): nothing in migvisor
// opens /dev/fdset/N, so a removed descriptor has no duplicate to wait for and is closed
// at once.
type fdsets struct {
	mu   sync.Mutex
	sets []*fdset // ordered by id
}

type fdset struct {
	id  int64
	fds []fdsetFD // newest first, as QEMU lists them
}

type fdsetFD struct {
	file   *os.File
	opaque *string
}

// addfdInfo is add-fd's reply (AddfdInfo).
type addfdInfo struct {
	FdsetID int64 `json:"fdset-id"`
	FD      int64 `json:"fd"`
}

type fdsetInfo struct {
	FdsetID int64         `json:"fdset-id"`
	Fds     []fdsetFDInfo `json:"fds"`
}

type fdsetFDInfo struct {
	FD     int64   `json:"fd"`
	Opaque *string `json:"opaque,omitempty"`
}

// add is monitor_fdset_add_fd: into the set asked for, created if need be, or into a new set
// with the lowest free id.
func (s *fdsets) add(fd *os.File, id *int64, opaque *string) (*addfdInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var set *fdset
	if id != nil {
		if i := slices.IndexFunc(s.sets, func(x *fdset) bool { return x.id == *id }); i >= 0 {
			set = s.sets[i]
		} else if *id < 0 {
			return nil, qerr.Generic("Parameter 'fdset-id' expects a non-negative value")
		}
	}
	if set == nil {
		next := int64(0)
		if id != nil {
			next = *id
		} else {
			for _, x := range s.sets {
				if x.id != next {
					break
				}
				next++
			}
		}
		set = &fdset{id: next}
		i, _ := slices.BinarySearchFunc(s.sets, next, func(x *fdset, id int64) int { return cmpInt(x.id, id) })
		s.sets = slices.Insert(s.sets, i, set)
	}
	set.fds = slices.Insert(set.fds, 0, fdsetFD{file: fd, opaque: opaque})
	return &addfdInfo{FdsetID: set.id, FD: int64(fd.Fd())}, nil
}

func cmpInt(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// remove is qmp_remove_fd: one descriptor of a set, or the whole set.
func (s *fdsets) remove(id int64, fd *int64) error {
	s.mu.Lock()
	i := slices.IndexFunc(s.sets, func(x *fdset) bool { return x.id == id })
	var gone []*os.File
	if i >= 0 {
		set := s.sets[i]
		kept := set.fds[:0]
		for _, f := range set.fds {
			if fd == nil || int64(f.file.Fd()) == *fd {
				gone = append(gone, f.file)
			} else {
				kept = append(kept, f)
			}
		}
		set.fds = kept
		if len(set.fds) == 0 {
			s.sets = slices.Delete(s.sets, i, i+1)
		}
	}
	s.mu.Unlock()
	if i < 0 || (fd != nil && len(gone) == 0) {
		what := fmt.Sprintf("fdset-id:%d", id)
		if fd != nil {
			what += fmt.Sprintf(", fd:%d", *fd)
		}
		return qerr.Generic(errFDNotFound, what)
	}
	closeAll(gone)
	return nil
}

// query is query-fdsets, listed as QEMU builds it (by prepending): the highest id first.
func (s *fdsets) query() []fdsetInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]fdsetInfo, 0, len(s.sets))
	for i := len(s.sets) - 1; i >= 0; i-- {
		set := s.sets[i]
		info := fdsetInfo{FdsetID: set.id, Fds: make([]fdsetFDInfo, 0, len(set.fds))}
		for j := len(set.fds) - 1; j >= 0; j-- {
			f := set.fds[j]
			info.Fds = append(info.Fds, fdsetFDInfo{FD: int64(f.file.Fd()), Opaque: f.opaque})
		}
		out = append(out, info)
	}
	return out
}

func (s *fdsets) close() {
	s.mu.Lock()
	sets := s.sets
	s.sets = nil
	s.mu.Unlock()
	for _, set := range sets {
		for _, f := range set.fds {
			f.file.Close()
		}
	}
}

// handleFDs registers QEMU's descriptor commands: getfd and closefd on the client's own
// table, add-fd, remove-fd and query-fdsets on the server's sets.
func (s *Server) handleFDs() {
	type named struct {
		FDName string `json:"fdname"`
	}
	s.handlers["getfd"] = func(ctx context.Context, args json.RawMessage) (any, error) {
		var a named
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		f := SessionFDs(ctx)
		fd := f.claim()
		if fd == nil {
			return nil, qerr.Generic(errNoFDSupplied)
		}
		return nil, f.name(a.FDName, fd)
	}
	s.handlers["closefd"] = func(ctx context.Context, args json.RawMessage) (any, error) {
		var a named
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		return nil, SessionFDs(ctx).closeNamed(a.FDName)
	}
	s.handlers["add-fd"] = func(ctx context.Context, args json.RawMessage) (any, error) {
		var a struct {
			FdsetID *int64  `json:"fdset-id"`
			Opaque  *string `json:"opaque"`
		}
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		fd := SessionFDs(ctx).claim()
		if fd == nil {
			return nil, qerr.Generic(errNoFDSupplied)
		}
		info, err := s.fdsets.add(fd, a.FdsetID, a.Opaque)
		if err != nil {
			fd.Close()
			return nil, err
		}
		return info, nil
	}
	s.handlers["remove-fd"] = func(_ context.Context, args json.RawMessage) (any, error) {
		var a struct {
			FdsetID int64  `json:"fdset-id"`
			FD      *int64 `json:"fd"`
		}
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		return nil, s.fdsets.remove(a.FdsetID, a.FD)
	}
	s.handlers["query-fdsets"] = func(context.Context, json.RawMessage) (any, error) {
		return s.fdsets.query(), nil
	}
}

// isDigitName reports a name QEMU reserves for descriptor numbers.
func isDigitName(s string) bool { return s != "" && s[0] >= '0' && s[0] <= '9' }
