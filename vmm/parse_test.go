package vmm

import (
	"testing"

	"github.com/migvisor/migvisor/qerr"
	"github.com/stretchr/testify/require"
)

func TestParseSize(t *testing.T) {
	bad := qerr.Generic("Parameter 'size' expects a non-negative number below 2^64")
	for _, tc := range []struct {
		in   string
		want uint64
		err  error
	}{
		{"0", 0, nil},
		{"4096", 4096, nil},
		{"512B", 512, nil},
		{"1k", 1024, nil},
		{"256M", 256 << 20, nil},
		{"1G", 1 << 30, nil},
		{"1.5G", 3 << 29, nil},
		{"2T", 2 << 40, nil},
		{"0x1000", 4096, nil},
		{"15E", 15 << 60, nil},
		{"16E", 0, bad},
		{"1.5", 0, bad},
		{"-1", 0, bad},
		{"", 0, bad},
		{"M", 0, bad},
		{"12Q", 0, bad},
		{"1e3", 0, bad},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseSize(tc.in)
			require.Equal(t, tc.err, err)
			require.Equal(t, tc.want, got)
		})
	}
}

func TestParseMemSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
		err  error
	}{
		{"512", 512 << 20, nil},
		{"size=512", 512 << 20, nil},
		{"1G", 1 << 30, nil},
		{"1.5", 3 << 19, nil},
		{"4097B", 8192, nil}, // rounded up to 8 KiB, as QEMU does
		{"0", 0, nil},        // QEMU: the default size
		{"", 0, qerr.Generic("missing 'size' option value")},
		{"lots", 0, qerr.Generic("Parameter 'size' expects a non-negative number below 2^64")},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseMemSize(tc.in)
			require.Equal(t, tc.err, err)
			require.Equal(t, tc.want, got)
		})
	}
}

func TestParseWorkload(t *testing.T) {
	for _, tc := range []struct {
		in   string
		cpus []int
		w    Workload
		err  string
	}{
		{"cpus=0,mode=write,size=256M,rate=200M,bytes=8", []int{0},
			Workload{Mode: ModeWrite, Size: 256 << 20, Rate: 200 << 20, BytesPerPage: 8}, ""},
		{"cpus=1-3", []int{1, 2, 3}, Workload{Mode: ModeWrite, BytesPerPage: 8}, ""},
		{"cpus=0:2,cpus=5,mode=read", []int{0, 2, 5}, Workload{Mode: ModeRead, BytesPerPage: 8}, ""},
		{"mode=idle,cpus=1", []int{1}, Workload{Mode: ModeIdle, BytesPerPage: 8}, ""},
		{"cpus=0,bytes=4096", []int{0}, Workload{Mode: ModeWrite, BytesPerPage: 4096}, ""},
		{"mode=write", nil, Workload{}, "Parameter 'cpus' is missing"},
		{"cpus=0,mode=fast", nil, Workload{}, "Parameter 'mode' does not accept value 'fast'"},
		{"cpus=0,bytes=6", nil, Workload{}, "Parameter 'bytes' expects a multiple of 4 between 4 and 4096"},
		{"cpus=0,size=big", nil, Workload{}, "Parameter 'size' expects a non-negative number below 2^64"},
		{"cpus=0,rate=-5", nil, Workload{}, "Parameter 'rate' expects a non-negative number below 2^64"},
		{"cpus=3-1", nil, Workload{}, "Parameter 'cpus' expects a CPU index, range or list"},
		{"cpus=0,colour=red", nil, Workload{}, "Invalid parameter 'colour'"},
		{"cpus", nil, Workload{}, "Parameter 'cpus' is missing a value"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			cpus, w, err := ParseWorkload(tc.in)
			if tc.err != "" {
				require.Equal(t, qerr.Generic("%s", tc.err), err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.cpus, cpus)
			require.Equal(t, tc.w, w)
		})
	}
}

func TestValidateRingSize(t *testing.T) {
	for _, tc := range []struct {
		n   int
		err string
	}{
		{0, ""},
		{1024, ""},
		{4096, ""},
		{65536, ""},
		{3000, "dirty-ring-size must be a power of two."},
		{-4, "dirty-ring-size must be a power of two."},
		{131072, "KVM dirty ring size 131072 too big (maximum is 65536).  Please use a smaller value."},
		{512, "Enabling of KVM dirty ring failed: Invalid argument. Suggested minimum value is 1024."},
	} {
		err := ValidateRingSize(tc.n)
		if tc.err == "" {
			require.NoError(t, err, tc.n)
		} else {
			require.Equal(t, qerr.Generic("%s", tc.err), err, tc.n)
		}
	}
}
