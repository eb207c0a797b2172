// Package systemd tells systemd about kpr's state (sd_notify): READY=1 once the datapath is
// loaded, attached and restored, STATUS= lines, WATCHDOG=1 only while the agent reports itself
// healthy, and STOPPING=1. Without NOTIFY_SOCKET every call is a no-op.
package systemd

import (
	"context"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Notifier sends sd_notify messages.
type Notifier struct {
	// Log is called when a message cannot be sent; nil discards.
	Log func(format string, args ...any)
}

func (n Notifier) send(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil && n.Log != nil {
		n.Log("sd_notify %q: %v", state, err)
	}
}

// Ready says the service is up.
func (n Notifier) Ready() { n.send(daemon.SdNotifyReady) }

// Status sets the one-line status systemctl shows.
func (n Notifier) Status(s string) { n.send("STATUS=" + s) }

// Stopping says the service is shutting down.
func (n Notifier) Stopping() { n.send(daemon.SdNotifyStopping) }

// Watchdog pings systemd's watchdog at half the configured WatchdogSec for as long as ctx
// lives, but only while healthy() is true: a stuck or failing agent stops pinging and systemd
// restarts it. It returns at once when the watchdog is not enabled for this process.
func (n Notifier) Watchdog(ctx context.Context, healthy func() bool) {
	interval, err := daemon.SdWatchdogEnabled(false)
	if err != nil || interval <= 0 {
		return
	}
	t := time.NewTicker(interval / 2)
	defer t.Stop()
	for {
		if healthy() {
			n.send(daemon.SdNotifyWatchdog)
		} else if n.Log != nil {
			n.Log("agent unhealthy: not pinging the systemd watchdog")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
