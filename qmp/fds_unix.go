package qmp

import (
	"net"
	"os"
	"syscall"
)

// maxFDs is how many descriptors one read accepts, as QEMU's socket chardev (TCP_MAX_FDS);
// the kernel closes any beyond the room given.
const maxFDs = 16

// oobSize is the ancillary buffer one read needs for maxFDs descriptors.
var oobSize = syscall.CmsgSpace(maxFDs * 4)

// readFDs reads from a unix socket with the descriptors passed alongside the data (SCM_RIGHTS).
// Go's ReadMsgUnix receives them close-on-exec.
func readFDs(c *net.UnixConn, buf, oob []byte) (int, []*os.File, error) {
	n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	n, oobn = max(n, 0), max(oobn, 0) // a failed read may report -1
	if oobn == 0 {
		return n, nil, err
	}
	msgs, perr := syscall.ParseSocketControlMessage(oob[:oobn])
	if perr != nil {
		return n, nil, err
	}
	var files []*os.File
	for i := range msgs {
		fds, rerr := syscall.ParseUnixRights(&msgs[i])
		if rerr != nil {
			continue // other ancillary data (credentials) carries no descriptor
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "SCM_RIGHTS"))
		}
	}
	return n, files, err
}
