package main

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestParseArgs(t *testing.T) {
	for _, tc := range []struct {
		name  string
		args  []string
		check func(t *testing.T, c *config)
	}{
		{"defaults", nil, func(t *testing.T, c *config) {
			require.Equal(t, uint64(512<<20), c.memSize)
			require.Equal(t, 2, c.cpus)
			require.Equal(t, defaultUUID, c.uuid)
			require.Empty(t, c.qmp)
			require.Empty(t, c.workloads, "every vCPU idle")
		}},
		{"qmp unix and tcp", []string{"-qmp", "unix:/tmp/a.sock,server=on,wait=off", "-qmp", "tcp:127.0.0.1:4444,server,nowait"},
			func(t *testing.T, c *config) {
				require.Equal(t, []endpoint{{"unix", "/tmp/a.sock", false}, {"tcp", "127.0.0.1:4444", false}}, c.qmp)
			}},
		{"qmp waits by default", []string{"-qmp", "unix:/tmp/a.sock,server=on"}, func(t *testing.T, c *config) {
			require.True(t, c.qmp[0].wait)
		}},
		{"memory forms", []string{"-m", "1G"}, func(t *testing.T, c *config) { require.Equal(t, uint64(1<<30), c.memSize) }},
		{"memory bare MiB", []string{"-m", "256"}, func(t *testing.T, c *config) { require.Equal(t, uint64(256<<20), c.memSize) }},
		{"memory size=", []string{"-m", "size=64M"}, func(t *testing.T, c *config) { require.Equal(t, uint64(64<<20), c.memSize) }},
		{"smp", []string{"-smp", "cpus=4"}, func(t *testing.T, c *config) { require.Equal(t, 4, c.cpus) }},
		{"smp past any machine's limit", []string{"-smp", "1000000"}, func(t *testing.T, c *config) {
			require.Equal(t, 1000000, c.cpus) // refused by the machine, with QEMU's text
			require.Empty(t, c.workloads)
		}},
		{"accel ring", []string{"-accel", "kvm,dirty-ring-size=4096"}, func(t *testing.T, c *config) {
			require.Equal(t, "kvm", c.accel)
			require.Equal(t, 4096, c.ringSize)
		}},
		{"name and uuid", []string{"-name", "guest=vm1,debug-threads=on", "-uuid", "4A3B2C1D-0000-1111-2222-333344445555"},
			func(t *testing.T, c *config) {
				require.Equal(t, "vm1", c.name)
				require.Equal(t, "4a3b2c1d-0000-1111-2222-333344445555", c.uuid)
			}},
		{"flags", []string{"-S", "-incoming", "defer"}, func(t *testing.T, c *config) {
			require.True(t, c.startPaused)
			require.Equal(t, "defer", c.incoming)
		}},
		{"workloads", []string{"-smp", "3", "-workload", "cpus=0,mode=write", "-workload", "cpus=1-2,mode=read"},
			func(t *testing.T, c *config) {
				require.Equal(t, "write", c.workloads[0].Mode)
				require.Equal(t, "read", c.workloads[1].Mode)
				require.Equal(t, "read", c.workloads[2].Mode)
			}},
		{"workloads up to the last vCPU named", []string{"-smp", "256", "-workload", "cpus=3,mode=write"},
			func(t *testing.T, c *config) {
				require.Len(t, c.workloads, 4)
				require.Equal(t, "write", c.workloads[3].Mode)
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := parseArgs(tc.args)
			require.NoError(t, err)
			tc.check(t, c)
		})
	}
}

func TestParseArgsErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"unknown option", []string{"-bogus"}, "-bogus: invalid option"},
		{"not an option", []string{"foo"}, "foo: invalid option"},
		{"missing value", []string{"-m"}, "-m: requires an argument"},
		{"qmp client mode", []string{"-qmp", "unix:/tmp/x"}, "only server=on is supported"},
		{"qmp scheme", []string{"-qmp", "pipe:/tmp/x,server=on"}, "not a supported char driver"},
		{"qmp bad key", []string{"-qmp", "unix:/tmp/x,server=on,colour=red"}, "invalid parameter 'colour'"},
		{"ring not power of two", []string{"-accel", "kvm,dirty-ring-size=3000"}, "dirty-ring-size must be a power of two."},
		{"ring too big", []string{"-accel", "kvm,dirty-ring-size=131072"}, "KVM dirty ring size 131072 too big (maximum is 65536).  Please use a smaller value."},
		{"ring too small", []string{"-accel", "kvm,dirty-ring-size=512"}, "Suggested minimum value is 1024."},
		{"ring not a number", []string{"-accel", "kvm,dirty-ring-size=-1"}, "Parameter 'dirty-ring-size' expects uint32_t"},
		{"accel unknown", []string{"-accel", "tcg"}, "invalid accelerator tcg"},
		{"smp zero", []string{"-smp", "0"}, "invalid number of CPUs"},
		{"mem garbage", []string{"-m", "lots"}, "-m lots"},
		{"uuid", []string{"-uuid", "nope"}, "invalid UUID"},
		{"workload cpu out of range", []string{"-workload", "cpus=5,mode=write"}, "cpu 5 out of range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseArgs(tc.args)
			require.Error(t, err)
			require.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestResolveAccel(t *testing.T) {
	noKVM := errors.New("open /dev/kvm: no such file or directory")
	for _, tc := range []struct {
		asked   string
		kvmErr  error
		want    string
		warns   bool
		wantErr bool
	}{
		{"kvm", nil, "kvm", false, false},
		{"kvm", noKVM, "", false, true},
		{"soft", nil, "soft", false, false},
		{"kvm:soft", noKVM, "soft", true, false},
		{"", nil, "kvm", false, false},
		{"", noKVM, "soft", true, false},
	} {
		t.Run(tc.asked+"/"+tc.want, func(t *testing.T) {
			warned := false
			got, err := resolveAccel(tc.asked, tc.kvmErr, func(string) { warned = true })
			if tc.wantErr {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
			require.Equal(t, tc.warns, warned)
		})
	}
}
