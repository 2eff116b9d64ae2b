package controller

// The QMP shapes the controller reads, with QEMU's member names. Only what it uses.

// MigrationInfo is query-migrate's answer.
type MigrationInfo struct {
	Status                         string         `json:"status"`
	TotalTime                      int64          `json:"total-time"`
	SetupTime                      int64          `json:"setup-time"`
	Downtime                       int64          `json:"downtime"`
	ExpectedDowntime               int64          `json:"expected-downtime"`
	ErrorDesc                      string         `json:"error-desc"`
	CPUThrottlePercentage          int64          `json:"cpu-throttle-percentage"`
	DirtyLimitThrottleTimePerRound uint64         `json:"dirty-limit-throttle-time-per-round"`
	RAM                            MigrationStats `json:"ram"`
}

// MigrationStats is query-migrate's "ram".
type MigrationStats struct {
	Transferred    uint64  `json:"transferred"`
	Remaining      uint64  `json:"remaining"`
	Total          uint64  `json:"total"`
	DirtyPagesRate uint64  `json:"dirty-pages-rate"`
	Mbps           float64 `json:"mbps"`
	DirtySyncCount int64   `json:"dirty-sync-count"`
	PageSize       uint64  `json:"page-size"`
}

// Terminal reports whether a migration in this status has ended.
func Terminal(status string) bool {
	return status == "completed" || status == "failed" || status == "cancelled"
}

type capability struct {
	Capability string `json:"capability"`
	State      bool   `json:"state"`
}

type dirtyRateInfo struct {
	Status    string `json:"status"`
	Mode      string `json:"mode"`
	DirtyRate *int64 `json:"dirty-rate"`
	VCPU      []struct {
		ID        int   `json:"id"`
		DirtyRate int64 `json:"dirty-rate"`
	} `json:"vcpu-dirty-rate"`
}

// vcpuLimit is one entry of query-vcpu-dirty-limit.
type vcpuLimit struct {
	CPU         int    `json:"cpu-index"`
	LimitRate   uint64 `json:"limit-rate"`
	CurrentRate uint64 `json:"current-rate"`
}

// WorkloadStat is one vCPU of migvisor's x-query-workload.
type WorkloadStat struct {
	CPU            int    `json:"cpu-index"`
	Mode           string `json:"mode"`
	Pages          uint64 `json:"pages"`
	PagesPerSecond uint64 `json:"pages-per-second"`
	Error          string `json:"error,omitempty"`
}
