package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/migvisor/migvisor/qmp"
)

// daemon is a migvisor process that a benchmark started, and a QMP client of it.
type daemon struct {
	cmd  *exec.Cmd
	sock string
	qmp  *qmp.Client
}

// migvisorPath finds the daemon: beside migctl (bin/ after `make build`), else on PATH.
func migvisorPath() (string, error) {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "migvisor")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath("migvisor")
	if err != nil {
		return "", errors.New("cannot find the migvisor binary: run `make build` and use bin/migctl")
	}
	return p, nil
}

// startDaemon runs migvisor with args plus a QMP socket in dir, and connects to it.
func startDaemon(ctx context.Context, dir, name string, args ...string) (*daemon, error) {
	bin, err := migvisorPath()
	if err != nil {
		return nil, err
	}
	return startProcess(ctx, dir, name, bin, args...)
}

// startProcess runs bin (migvisor or QEMU: the same options) with args plus -name and a QMP
// socket in dir, and connects to it.
func startProcess(ctx context.Context, dir, name, bin string, args ...string) (*daemon, error) {
	sock := filepath.Join(dir, name+".qmp")
	args = append(args, "-name", name, "-qmp", "unix:"+sock+",server=on,wait=off")
	cmd := exec.Command(bin, args...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	d := &daemon{cmd: cmd, sock: sock}
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := qmp.Dial(ctx, "unix", sock)
		if err == nil {
			d.qmp = c
			return d, nil
		}
		if time.Now().After(deadline) {
			d.kill()
			return nil, fmt.Errorf("%s did not answer on %s: %v", name, sock, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (d *daemon) exec(ctx context.Context, cmd string, args, result any) error {
	return d.qmp.Execute(ctx, cmd, args, result)
}

// stop quits the daemon politely, then kills it if it does not go.
func (d *daemon) stop(ctx context.Context) {
	if d.qmp != nil {
		_ = d.qmp.Execute(ctx, "quit", nil, nil)
		d.qmp.Close()
	}
	done := make(chan struct{})
	go func() { d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		d.kill()
		<-done
	}
}

func (d *daemon) kill() { _ = d.cmd.Process.Kill() }
