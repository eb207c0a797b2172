package systemd

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// listen makes a notify socket like systemd's and returns the messages sent to it.
func listen(t *testing.T) <-chan string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", sock)
	msgs := make(chan string, 1000)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	return msgs
}

// count drains msgs for d and counts the messages holding what.
func count(msgs <-chan string, what string, d time.Duration) int {
	n := 0
	deadline := time.After(d)
	for {
		select {
		case m := <-msgs:
			if strings.Contains(m, what) {
				n++
			}
		case <-deadline:
			return n
		}
	}
}

// WATCHDOG=1 comes at half WatchdogSec while the agent is healthy, stops while it is not
// (so systemd restarts a stuck agent), and resumes when it recovers.
func TestWatchdogOnlyWhileHealthy(t *testing.T) {
	msgs := listen(t)
	t.Setenv("WATCHDOG_USEC", "200000") // 200ms: pings every 100ms
	var healthy atomic.Bool
	healthy.Store(true)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { Notifier{}.Watchdog(ctx, healthy.Load); close(done) }()
	defer func() { cancel(); <-done }()

	if n := count(msgs, "WATCHDOG=1", time.Second); n < 5 {
		t.Fatalf("healthy: %d watchdog pings in 1s, want about 10", n)
	}
	healthy.Store(false)
	count(msgs, "WATCHDOG=1", 150*time.Millisecond) // one may be on its way
	if n := count(msgs, "WATCHDOG=1", time.Second); n != 0 {
		t.Fatalf("unhealthy: %d watchdog pings in 1s, want none", n)
	}
	healthy.Store(true)
	if n := count(msgs, "WATCHDOG=1", 500*time.Millisecond); n < 2 {
		t.Fatalf("healthy again: %d watchdog pings in 0.5s", n)
	}
}

// Without WatchdogSec, Watchdog returns at once and sends nothing.
func TestWatchdogDisabled(t *testing.T) {
	msgs := listen(t)
	t.Setenv("WATCHDOG_USEC", "")
	done := make(chan struct{})
	go func() { Notifier{}.Watchdog(context.Background(), func() bool { return true }); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Watchdog did not return without WATCHDOG_USEC")
	}
	if n := count(msgs, "WATCHDOG=1", 200*time.Millisecond); n != 0 {
		t.Fatalf("%d pings without a watchdog", n)
	}
}
