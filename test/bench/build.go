package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/kpr-dev/kpr/test/sandbox"
)

const buildTimeout = 5 * time.Minute

// ModuleRoot is the kpr module's directory: from this source file, else `go env GOMOD`.
func ModuleRoot() (string, error) {
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		dir := filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
	}
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", err
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the kpr module")
	}
	return filepath.Dir(gomod), nil
}

func goBuild(dir, out string, env []string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", append([]string{"build", "-o", out}, args...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	if msg, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(msg)))
	}
	return nil
}

// buildKpr builds cmd/kpr as `make build` does (version stamped from git) and returns the
// binary and its version. rev, when set, names a git revision to build instead of the working
// tree: it is exported with git archive into dir, so the working tree is not touched.
func buildKpr(dir, rev string) (string, string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", "", err
	}
	src := root
	describe := []string{"-C", root, "describe", "--tags", "--always", "--dirty"}
	if rev != "" {
		src = filepath.Join(dir, "kpr-src")
		if err := os.MkdirAll(src, 0o755); err != nil {
			return "", "", err
		}
		ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
		defer cancel()
		archive := exec.CommandContext(ctx, "sh", "-c", `git -C "$1" archive --format=tar "$2" | tar -x -C "$3"`, "sh", root, rev, src)
		if msg, err := archive.CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("git archive %s: %w: %s", rev, err, msg)
		}
		describe = []string{"-C", root, "describe", "--tags", "--always", rev}
	}
	version := "dev"
	if out, err := exec.Command("git", describe...).Output(); err == nil {
		version = strings.TrimSpace(string(out))
	}
	bin := filepath.Join(dir, "kpr")
	err = goBuild(src, bin, nil, "-trimpath", "-ldflags", "-X github.com/kpr-dev/kpr/node/agent.Version="+version, "./cmd/kpr")
	return bin, version, err
}

// buildLoadgen builds test/loadgen, static so it runs in any namespace.
func buildLoadgen(dir string) (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "loadgen")
	return bin, goBuild(root, bin, []string{"CGO_ENABLED=0"}, "-trimpath", "./test/loadgen")
}

// kubeProxyBinary is kube-proxy next to the sandbox's kube-apiserver (hack/k8s.sh bins).
func kubeProxyBinary(dir string) (string, error) {
	if dir == "" {
		var ok bool
		if dir, ok = sandbox.K8sBinDir(); !ok {
			return "", errors.New("no Kubernetes binaries: run hack/k8s.sh bins or set KPR_K8S_BINDIR")
		}
	}
	bin := filepath.Join(dir, "kube-proxy")
	st, err := os.Stat(bin)
	if err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		return "", fmt.Errorf("kube-proxy binary not found at %s (run hack/k8s.sh bins)", bin)
	}
	return bin, nil
}
