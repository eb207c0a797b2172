package sandbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kpr-dev/kpr/bpf"
)

// Cgroup is a cgroup v2 directory made by the sandbox, for Cmd.CgroupFD and for attaching cgroup
// BPF programs to exactly the processes a test puts there.
type Cgroup struct {
	Path string // e.g. /sys/fs/cgroup/unified/kpr-e2e-1a2b3c-cg-node1
	FD   int    // open directory, valid until Close
	file *os.File
}

// NewCgroup creates "<prefix>-cg-<name>" below the test process's own cgroup v2 directory. Close
// removes it after the processes started in the sandbox are gone.
func (cp *ControlPlane) NewCgroup(name string) (*Cgroup, error) {
	if !nodeNameRE.MatchString(name) {
		return nil, fmt.Errorf("sandbox: cgroup name %q: want a short DNS label", name)
	}
	if cp.isClosed() {
		return nil, errClosed
	}
	parent, err := ownCgroup2Dir()
	if err != nil {
		return nil, fmt.Errorf("sandbox: cgroup: %w", err)
	}
	path := filepath.Join(parent, cp.Prefix+"-cg-"+name)
	if err := os.Mkdir(path, 0o755); err != nil {
		return nil, fmt.Errorf("sandbox: cgroup: %w", err)
	}
	f, err := os.Open(path)
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("sandbox: cgroup: %w", err)
	}
	cg := &Cgroup{Path: path, FD: int(f.Fd()), file: f}
	cp.cleanup.push("remove cgroup "+path, func() error {
		f.Close()
		return os.Remove(path)
	})
	return cg, nil
}

// ownCgroup2Dir is the test process's cgroup in the cgroup v2 hierarchy, wherever that is
// mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts).
func ownCgroup2Dir() (string, error) {
	mount, err := bpf.CgroupV2Mount()
	if err != nil {
		return "", err
	}
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			return filepath.Join(mount, rest), nil
		}
	}
	return "", errors.New("no cgroup v2 entry in /proc/self/cgroup")
}
