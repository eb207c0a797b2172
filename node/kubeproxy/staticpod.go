package kubeproxy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// StaticPods takes a kube-proxy that kubelet runs from a static pod manifest (GKE-style nodes)
// off a node, and puts it back.
type StaticPods struct {
	ManifestsDir string // kubelet's staticPodPath, /etc/kubernetes/manifests on kubeadm nodes
	BackupDir    string // where the manifests go; never overwritten
	// Wait bounds the wait for kubelet to stop kube-proxy once its manifest is gone.
	Wait time.Duration
}

// Remove moves every kube-proxy manifest out of ManifestsDir into BackupDir, then waits until
// kubelet has stopped kube-proxy: no process called kube-proxy is left in this network
// namespace (a static kube-proxy runs in the host's). It returns the manifests it moved.
func (s StaticPods) Remove(ctx context.Context) ([]string, error) {
	files, err := s.manifests(s.ManifestsDir)
	if err != nil {
		return nil, err
	}
	var moved []string
	for _, f := range files {
		dst := filepath.Join(s.BackupDir, filepath.Base(f))
		if _, err := os.Stat(dst); err == nil {
			return moved, fmt.Errorf("%s exists from an earlier run; restore it (kpr kubeadm restore-node) or move it away", dst)
		}
		if err := os.MkdirAll(s.BackupDir, 0o700); err != nil {
			return moved, err
		}
		if err := move(f, dst); err != nil {
			return moved, err
		}
		moved = append(moved, f+" -> "+dst)
	}
	if len(moved) == 0 {
		return nil, nil
	}
	deadline := time.Now().Add(s.Wait)
	for {
		pids := Processes()
		if len(pids) == 0 {
			return moved, nil
		}
		if time.Now().After(deadline) {
			return moved, fmt.Errorf("kubelet has not stopped kube-proxy (pids %v) within %s of its manifest leaving %s", pids, s.Wait, s.ManifestsDir)
		}
		select {
		case <-ctx.Done():
			return moved, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Restore moves the manifests Remove saved back into ManifestsDir (kubelet starts kube-proxy
// again); an existing manifest there is not overwritten.
func (s StaticPods) Restore() ([]string, error) {
	files, err := s.manifests(s.BackupDir)
	if err != nil || len(files) == 0 {
		return nil, err
	}
	var back []string
	for _, f := range files {
		dst := filepath.Join(s.ManifestsDir, filepath.Base(f))
		if _, err := os.Stat(dst); err == nil {
			return back, fmt.Errorf("%s exists: not overwritten", dst)
		}
		if err := move(f, dst); err != nil {
			return back, err
		}
		back = append(back, f+" -> "+dst)
	}
	return back, nil
}

// manifests lists the kube-proxy static pod manifests in dir: files kubelet would read (it
// skips hidden ones) holding a Pod that is kube-proxy by name or label.
func (s StaticPods) manifests(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if !e.Type().IsRegular() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		path := filepath.Join(dir, e.Name())
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		var pod v1.Pod
		if yaml.Unmarshal(data, &pod) != nil || pod.Kind != "Pod" {
			continue
		}
		if strings.HasPrefix(pod.Name, "kube-proxy") || pod.Labels["component"] == "kube-proxy" || pod.Labels["k8s-app"] == "kube-proxy" {
			out = append(out, path)
		}
	}
	return out, nil
}

// move renames, or copies and removes across file systems, keeping the mode.
func move(src, dst string) error {
	if err := os.Rename(src, dst); err == nil {
		return nil
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	st, err := os.Stat(src)
	if err != nil {
		return err
	}
	if err := os.WriteFile(dst, data, st.Mode().Perm()); err != nil {
		return err
	}
	return os.Remove(src)
}

// Processes are the pids of processes called kube-proxy in this process's network namespace.
func Processes() []int {
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return nil
	}
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
		if err != nil || strings.TrimSpace(string(comm)) != "kube-proxy" {
			continue
		}
		if ns, err := os.Readlink(filepath.Join("/proc", e.Name(), "ns/net")); err == nil && ns == self {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	return pids
}
