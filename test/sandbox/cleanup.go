package sandbox

import (
	"errors"
	"fmt"
	"sync"
)

// cleanupStack undoes setup in reverse order. Every resource is pushed the moment it exists, so
// a setup that fails halfway undoes exactly what it made.
type cleanupStack struct {
	mu    sync.Mutex
	steps []cleanupStep
}

type cleanupStep struct {
	what string
	fn   func() error
}

func (s *cleanupStack) push(what string, fn func() error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.steps = append(s.steps, cleanupStep{what, fn})
}

// unwind runs every step, newest first, even when one fails, and empties the stack.
func (s *cleanupStack) unwind() error {
	s.mu.Lock()
	steps := s.steps
	s.steps = nil
	s.mu.Unlock()
	var errs []error
	for i := len(steps) - 1; i >= 0; i-- {
		if err := steps[i].fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", steps[i].what, err))
		}
	}
	return errors.Join(errs...)
}

// moveTo hands everything on s to dst as one step, once the operation that built s succeeded.
func (s *cleanupStack) moveTo(dst *cleanupStack, what string) {
	s.mu.Lock()
	steps := s.steps
	s.steps = nil
	s.mu.Unlock()
	if len(steps) == 0 {
		return
	}
	moved := &cleanupStack{steps: steps}
	dst.push(what, moved.unwind)
}
