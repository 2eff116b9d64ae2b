package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() { os.Exit(run(os.Args[1:])) }

func run(args []string) int {
	cfg, err := parseArgs(args)
	if err != nil {
		fmt.Fprintf(os.Stderr, "migvisor: %v\n", err)
		return 1
	}
	switch {
	case cfg.help:
		printUsage()
		return 0
	case cfg.version:
		fmt.Printf("migvisor version 0.1.0 (speaks the QMP of QEMU %d.%d)\n", version.Major, version.Minor)
		return 0
	}
	d, err := newDaemon(cfg, os.Stderr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "migvisor: %v\n", err)
		return 1
	}
	if err := d.listen(); err != nil {
		d.closeMachine()
		fmt.Fprintf(os.Stderr, "migvisor: %v\n", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	d.run(ctx)
	d.close()
	if d.failed != nil {
		return 1
	}
	return 0
}
