package agent

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// StatusFile is the name of the agent's status file inside runDir.
const StatusFile = "status.json"

// Status is what the running agent reports about itself, for `kpr status`.
type Status struct {
	Version          string    `json:"version"`
	PID              int       `json:"pid"`
	Started          time.Time `json:"started"`
	Stopped          time.Time `json:"stopped,omitzero"`
	Node             string    `json:"node"`
	APIServers       []string  `json:"apiServers"`
	API              string    `json:"api"`
	PinDir           string    `json:"pinDir"`
	Cgroup           string    `json:"cgroup"`
	Synced           bool      `json:"synced"`
	LastSync         time.Time `json:"lastSync,omitzero"`
	LastSyncDuration string    `json:"lastSyncDuration,omitempty"`
	LastSyncError    string    `json:"lastSyncError,omitempty"`
	// LastFullSync: the last sync that recomputed every Service and checked the maps.
	LastFullSync time.Time `json:"lastFullSync,omitzero"`
	Services     int       `json:"services"`
	Frontends    int       `json:"frontends"`
	Backends     int       `json:"backends"`
	// Networking is nil until the agent has read its configuration and the kubeadm files.
	Networking *Networking `json:"networking,omitempty"`
	// NorthSouth says whether and where traffic from outside the node is served; Masquerade
	// what kpr's nftables table does.
	NorthSouth string `json:"northSouth,omitempty"`
	Masquerade string `json:"masquerade,omitempty"`
	// HealthCheckPorts is the number of healthCheckNodePorts served; HealthCheckError the
	// ports that could not be opened.
	HealthCheckPorts int    `json:"healthCheckPorts,omitempty"`
	HealthCheckError string `json:"healthCheckError,omitempty"`
	// KubeProxy is set while a kube-proxy pod runs on this node (the guard's warning).
	KubeProxy string `json:"kubeProxy,omitempty"`
	Error     string `json:"error,omitempty"`
}

// Networking is the cluster networking the agent uses, each value with where it came from
// (a kpr config key, a kubeadm file and field, or why it is unknown).
type Networking struct {
	// ServiceCIDRs are programmed into the datapath: an unallocated address inside them is
	// refused. Empty: such addresses are left untranslated.
	ServiceCIDRs     []string `json:"serviceCIDRs"`
	ServiceCIDRsFrom string   `json:"serviceCIDRsFrom"`
	PodCIDRs         []string `json:"podCIDRs"`
	PodCIDRsFrom     string   `json:"podCIDRsFrom"`
	DNSDomain        string   `json:"dnsDomain"`
	DNSDomainFrom    string   `json:"dnsDomainFrom"`
}

// statusWriter keeps the status and writes it atomically on every change.
type statusWriter struct {
	dir string
	mu  sync.Mutex
	s   Status
}

func (w *statusWriter) get() Status {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.s
}

func (w *statusWriter) set(change func(*Status)) {
	w.mu.Lock()
	change(&w.s)
	b, _ := json.MarshalIndent(w.s, "", "  ")
	w.mu.Unlock()
	if w.dir == "" {
		return
	}
	if err := os.MkdirAll(w.dir, 0o755); err != nil {
		return
	}
	tmp := filepath.Join(w.dir, "."+StatusFile+".tmp")
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err == nil {
		_ = os.Rename(tmp, filepath.Join(w.dir, StatusFile))
	}
}

// ReadStatus reads the status file the agent writes in runDir.
func ReadStatus(runDir string) (*Status, error) {
	b, err := os.ReadFile(filepath.Join(runDir, StatusFile))
	if err != nil {
		return nil, err
	}
	var s Status
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(runDir, StatusFile), err)
	}
	return &s, nil
}

// ensureBPFFS mounts bpffs on /sys/fs/bpf when kpr's pin directory is below it and nothing is
// mounted there yet, as a node's init would; other locations must already be on a bpffs.
func ensureBPFFS(pinDir string) error {
	const root = "/sys/fs/bpf"
	rel, err := filepath.Rel(root, pinDir)
	if err != nil || rel == ".." || len(rel) >= 3 && rel[:3] == "../" {
		return nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		return fmt.Errorf("%s: %w", root, err)
	}
	if st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := unix.Mount("bpffs", root, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mounting bpffs on %s: %w", root, err)
	}
	return nil
}
