package sandbox

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// probeBuildTimeout bounds a probe build (cold builds of a small static binary).
const probeBuildTimeout = 5 * time.Minute

// BuildProbe builds test/probe into dir and returns the binary's path. The binary is static
// (CGO_ENABLED=0) so it runs in any namespace.
func BuildProbe(dir string) (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", fmt.Errorf("build probe: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	out, err := filepath.Abs(filepath.Join(dir, "probe"))
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), probeBuildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./test/probe")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if msg, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./test/probe: %w: %s", err, strings.TrimSpace(string(msg)))
	}
	return out, nil
}
