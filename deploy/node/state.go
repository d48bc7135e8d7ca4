package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The node keeps a little state under --state-dir: a lock (one changing action at a time on this
// host), the newest fencing token seen per member, and each member's restore journal.

func ensureDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fail("failed", "cannot create %s: %v", dir, err)
	}
	return nil
}

// lockHost takes the host's action lock, waiting at most `timeout` for another action to end.
func lockHost(cfg *Config, timeout time.Duration) (func(), error) {
	if err := ensureDir(cfg.StateDir); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(cfg.StateDir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fail("failed", "cannot open the lock: %v", err)
	}
	deadline := time.Now().Add(timeout)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fail("failed", "cannot lock %s: %v", f.Name(), err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fail("busy", "another etcd-chatops-node action still runs on this host after %s", timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func fencePath(cfg *Config, member string) string {
	return filepath.Join(cfg.StateDir, "fence-"+member)
}

func fenceSeen(cfg *Config, member string) (int64, bool) {
	data, err := os.ReadFile(fencePath(cfg, member))
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
	return n, err == nil
}

// checkFence refuses a token older than the newest seen for the member, so a deposed bot
// replica's late action changes nothing; a newer token is recorded before anything changes.
func checkFence(cfg *Config, member string, token int64) (int64, error) {
	seen, ok := fenceSeen(cfg, member)
	if ok && token < seen {
		return seen, fail("fenced", "fencing token %d is older than %d, the newest this node has seen for %s: "+
			"a newer bot leader acts on this member", token, seen, member)
	}
	if !ok || token > seen {
		if err := writeAtomic(fencePath(cfg, member), []byte(strconv.FormatInt(token, 10)+"\n"), 0o600); err != nil {
			return seen, err
		}
	}
	return token, nil
}

// writeAtomic replaces path with data so that a crash leaves the old or the new file, never half of one.
func writeAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fail("failed", "cannot write %s: %v", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fail("failed", "cannot write %s: %v", path, err)
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return fail("failed", "cannot write %s: %v", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fail("failed", "cannot write %s: %v", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fail("failed", "cannot write %s: %v", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fail("failed", "cannot write %s: %v", path, err)
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fail("failed", "cannot sync %s: %v", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fail("failed", "cannot sync %s: %v", dir, err)
	}
	return nil
}

// moveFile moves src to dst durably. A rename is atomic; across filesystems the copy is made
// first, so an interrupted move leaves both files equal, which the next run finishes.
func moveFile(src, dst string) error {
	if err := ensureDir(filepath.Dir(dst)); err != nil {
		return err
	}
	if existing, err := os.ReadFile(dst); err == nil {
		content, rerr := os.ReadFile(src)
		if rerr != nil {
			return fail("failed", "cannot read %s: %v", src, rerr)
		}
		if !bytes.Equal(existing, content) {
			return fail("precondition", "both %s and %s exist and differ: decide which one is right and remove "+
				"the other", src, dst)
		}
		if err := os.Remove(src); err != nil {
			return fail("failed", "cannot remove %s: %v", src, err)
		}
		return syncDir(filepath.Dir(src))
	}
	err := os.Rename(src, dst)
	if errors.Is(err, syscall.EXDEV) {
		content, rerr := os.ReadFile(src)
		if rerr != nil {
			return fail("failed", "cannot read %s: %v", src, rerr)
		}
		info, _ := os.Stat(src)
		if err := writeAtomic(dst, content, info.Mode().Perm()); err != nil {
			return err
		}
		err = os.Remove(src)
	}
	if err != nil {
		return fail("failed", "cannot move %s to %s: %v", src, dst, err)
	}
	if err := syncDir(filepath.Dir(src)); err != nil {
		return err
	}
	return syncDir(filepath.Dir(dst))
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// journal records a restore's progress for one member, so a repeated restore with the same token
// finishes the one that was interrupted instead of starting over.
type journal struct {
	Token    string `json:"token"`
	SHA256   string `json:"sha256"`
	DataDir  string `json:"data_dir"`          // the new data directory
	Previous string `json:"previous_data_dir"` // what the member used before
	MovedTo  string `json:"previous_moved_to,omitempty"`
	Kept     string `json:"previous_kept,omitempty"`
	Phase    string `json:"phase"` // restoring, restored, switched, done
}

func journalPath(cfg *Config, member string) string {
	return filepath.Join(cfg.StateDir, "restore-"+member+".json")
}

func loadJournal(cfg *Config, member string) journal {
	var j journal
	if data, err := os.ReadFile(journalPath(cfg, member)); err == nil {
		_ = json.Unmarshal(data, &j)
	}
	return j
}

func saveJournal(cfg *Config, member string, j journal) error {
	data, _ := json.Marshal(j)
	return writeAtomic(journalPath(cfg, member), append(data, '\n'), 0o600)
}

// readLimited reads all of r, refusing more than limit bytes.
func readLimited(r io.Reader, limit int64, what string) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, fail("failed", "cannot read %s: %v", what, err)
	}
	if int64(len(data)) > limit {
		return nil, badInput("%s is larger than %d bytes", what, limit)
	}
	return data, nil
}

// isMountPoint: a directory on another device than its parent cannot be renamed aside.
func isMountPoint(dir string) bool {
	var a, b syscall.Stat_t
	if syscall.Stat(dir, &a) != nil || syscall.Stat(filepath.Dir(dir), &b) != nil {
		return false
	}
	return a.Dev != b.Dev
}

func freeBytes(dir string) (uint64, error) {
	var s syscall.Statfs_t
	if err := syscall.Statfs(dir, &s); err != nil {
		return 0, err
	}
	return s.Bavail * uint64(s.Bsize), nil
}

func needSpace(dir string, need uint64, what string) error {
	free, err := freeBytes(dir)
	if err != nil {
		return fail("failed", "cannot see the free space of %s: %v", dir, err)
	}
	if free < need {
		return fail("precondition", "%s needs %d MiB free in %s, it has %d MiB", what, need>>20, dir, free>>20)
	}
	return nil
}

func sinceText(start time.Time) string {
	return fmt.Sprintf("%.1fs", time.Since(start).Seconds())
}
