package sandbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// How long Stop waits after SIGTERM before SIGKILL, and after SIGKILL before giving up.
const (
	stopGrace = 10 * time.Second
	killGrace = 10 * time.Second
)

// Cmd describes a process to run inside a sandbox namespace.
type Cmd struct {
	Name string   // program; looked up in PATH (inside nsenter) when it has no slash
	Args []string // arguments
	Env  []string // extra KEY=VALUE pairs on top of the test process's environment
	// CgroupFD, when > 0, is an open cgroup v2 directory the process starts in
	// (clone3 CLONE_INTO_CGROUP), so it never runs outside that cgroup.
	CgroupFD int
	// Stdin, when set, is the process's standard input (Start only); else it reads /dev/null.
	Stdin io.Reader
}

// Process is a long-running command started in a sandbox namespace. It is the leader of its own
// process group; Stop and Kill signal that group, so helpers it forked go too.
type Process struct {
	Name    string // program name
	NS      string // network namespace it runs in
	LogPath string // stdout and stderr

	cmd     *exec.Cmd
	done    chan struct{}
	err     error // from Wait, valid once done is closed
	stop    sync.Once
	stopErr error
}

// Pid is the process ID (nsenter execs the program, so this is the program itself).
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// Wait blocks until the process exits and returns its exit error.
func (p *Process) Wait() error {
	<-p.done
	return p.err
}

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Signal sends sig to the process group, unless the process has already been reaped (its ID may
// then belong to someone else).
func (p *Process) Signal(sig syscall.Signal) error {
	if p.Exited() {
		return nil
	}
	if err := syscall.Kill(-p.Pid(), sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return err
	}
	return nil
}

// Stop sends SIGTERM, waits up to 10s, then SIGKILL and waits up to 10s more. It returns nil
// once the process is gone, whatever its exit status; calling it again is harmless.
func (p *Process) Stop() error {
	p.stop.Do(func() { p.stopErr = p.terminate(syscall.SIGTERM, stopGrace) })
	// A concurrent caller (Close while ctx ends) waits for the first one's outcome.
	select {
	case <-p.done:
		return nil
	case <-time.After(stopGrace + killGrace):
		if p.stopErr != nil {
			return p.stopErr
		}
		return fmt.Errorf("%s (pid %d) still running", p.Name, p.Pid())
	}
}

// Kill sends SIGKILL and waits (bounded) for the process to go.
func (p *Process) Kill() error {
	return p.terminate(syscall.SIGKILL, killGrace)
}

func (p *Process) terminate(sig syscall.Signal, grace time.Duration) error {
	if err := p.Signal(sig); err != nil {
		return err
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
	}
	if sig == syscall.SIGKILL {
		return fmt.Errorf("%s (pid %d) did not exit %v after SIGKILL", p.Name, p.Pid(), grace)
	}
	if err := p.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(killGrace):
		return fmt.Errorf("%s (pid %d) did not exit %v after SIGKILL", p.Name, p.Pid(), killGrace)
	}
}

// LogTail returns up to n bytes from the end of the log, for error messages.
func (p *Process) LogTail(n int) string { return fileTail(p.LogPath, n) }

func fileTail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if len(data) > n {
		data = data[len(data)-n:]
	}
	return string(bytes.TrimSpace(data))
}

// procRunner starts processes in namespaces and remembers them so Close can stop them.
type procRunner struct {
	logDir  string
	cs      *cleanupStack
	spawner *spawner

	mu  sync.Mutex
	seq int
	all []*Process
}

var unsafeLogChars = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

// start runs c inside ns until Stop, Kill, Close or ctx is done (then it is stopped like Stop).
// logPath, when not empty, replaces the generated log file name.
func (r *procRunner) start(ctx context.Context, ns string, c Cmd, logPath string) (*Process, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.seq++
	seq := r.seq
	r.mu.Unlock()
	if logPath == "" {
		base := unsafeLogChars.ReplaceAllString(filepath.Base(c.Name), "_")
		logPath = filepath.Join(r.logDir, fmt.Sprintf("%s.%s.%d.log", ns, base, seq))
	}
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return nil, err
	}
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()

	cmd := nsCommand(ns, c)
	cmd.Stdin = c.Stdin
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if err := r.spawner.start(cmd); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", c.Name, ns, err)
	}
	p := &Process{Name: filepath.Base(c.Name), NS: ns, LogPath: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	if ctx.Done() != nil {
		go func() {
			select {
			case <-ctx.Done():
				_ = p.Stop()
			case <-p.done:
			}
		}()
	}
	r.mu.Lock()
	r.all = append(r.all, p)
	r.mu.Unlock()
	r.cs.push(fmt.Sprintf("stop %s (pid %d) in %s", p.Name, p.Pid(), ns), p.Stop)
	return p, nil
}

// processes returns every process started so far.
func (r *procRunner) processes() []*Process {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*Process(nil), r.all...)
}

// nsCommand builds nsenter --net=/run/netns/NS -- c.Name c.Args... nsenter is used rather than
// "ip netns exec", which remounts /sys and hides the cgroup and bpf filesystems kpr needs.
// The process leads its own process group and gets SIGKILL if the test process dies, so a
// crashed test does not leave daemons running in namespaces nobody will delete.
func nsCommand(ns string, c Cmd) *exec.Cmd {
	return nsCommandContext(context.Background(), ns, c)
}

func nsCommandContext(ctx context.Context, ns string, c Cmd) *exec.Cmd {
	args := append([]string{"--net=" + netnsPath(ns), "--", c.Name}, c.Args...)
	cmd := exec.CommandContext(ctx, "nsenter", args...)
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	if len(c.Env) > 0 {
		cmd.Env = append(os.Environ(), c.Env...)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if c.CgroupFD > 0 {
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = c.CgroupFD
	}
	return cmd
}

// exec runs a short command inside ns and returns its combined output. Without a deadline on
// ctx it is bounded by one minute.
func (r *procRunner) exec(ctx context.Context, ns string, c Cmd) ([]byte, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cmdTimeout)
		defer cancel()
	}
	cmd := nsCommandContext(ctx, ns, c)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := r.spawner.start(cmd)
	if err == nil {
		err = cmd.Wait()
	}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", err, ctx.Err())
		}
		return out.Bytes(), fmt.Errorf("%s %s in %s: %w: %s", c.Name, strings.Join(c.Args, " "), ns, err, truncate(out.String(), 2048))
	}
	return out.Bytes(), nil
}

func truncate(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// errClosed is returned for processes started after Close.
var errClosed = errors.New("sandbox: closed")

// spawner forks every sandbox process from one locked OS thread that lives until Close. Children
// get Pdeathsig, which the kernel ties to the thread that forked them, not the process: a Go
// thread can end (a goroutine that exits while locked to it, the usual way to abandon a thread
// left in another namespace), and that would SIGKILL etcd in the middle of a test.
type spawner struct {
	reqs chan spawnReq
	done chan struct{}
	once sync.Once
}

type spawnReq struct {
	cmd  *exec.Cmd
	errc chan error
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan spawnReq), done: make(chan struct{})}
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		for {
			select {
			case r := <-s.reqs:
				r.errc <- r.cmd.Start()
			case <-s.done:
				return
			}
		}
	}()
	return s
}

func (s *spawner) start(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	select {
	case s.reqs <- spawnReq{cmd, errc}:
		return <-errc
	case <-s.done:
		return errClosed
	}
}

// close ends the thread; call it once the processes are gone, since their Pdeathsig goes with it.
func (s *spawner) close() { s.once.Do(func() { close(s.done) }) }
