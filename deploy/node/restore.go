package main

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// restore runs `etcdutl snapshot restore` into a NEW data directory, then points the member's
// configuration at it (the manifest's etcd-data hostPath and --data-dir, or the drop-in's
// ETCD_DATA_DIR), then moves the previous data directory aside; nothing is ever deleted. A journal
// in the state dir lets a repeated restore with the same token finish an interrupted one.
func restore(cfg *Config, r Recipe, req *Request, stdin io.Reader, ans *Answer) (bool, error) {
	j := loadJournal(cfg, req.Member)
	same := j.Token == req.Token
	if same && j.Phase == "done" {
		var now Answer
		if err := r.Describe(req, &now); err == nil && now.DataDir == j.DataDir {
			fillRestore(ans, j)
			ans.Detail = "already restored with this token into " + j.DataDir
			return false, nil
		}
	}
	member, err := r.Current(req, stdin)
	if err != nil {
		return false, err
	}
	if probe := probeFor(member.Params); probe.Answering() {
		return false, fail("precondition", "the member still answers %s: stop it first", probe.URL)
	}
	if pid := findProcess(member.Params("data-dir")); pid != 0 {
		return false, fail("precondition", "etcd (pid %d) still runs on %s: stop it first", pid,
			member.Params("data-dir"))
	}
	previous := member.DataDir
	if same && j.Previous != "" {
		previous = j.Previous
	}
	newDir := req.DataDir
	if newDir == "" {
		newDir = restoredName(previous, req.Token)
	}
	if err := underRoot(newDir, cfg.DataRoot); err != nil {
		return false, fail("precondition", "the new data dir: %v; pass --data-dir under it", err)
	}
	if err := resolvedUnder(newDir, cfg.DataRoot); err != nil {
		return false, err
	}
	if newDir == previous {
		return false, fail("precondition", "%s is the member's current data dir: a restore goes into a new one", newDir)
	}
	snapshot, err := snapshotPath(cfg, req.Snapshot)
	if err != nil {
		return false, err
	}
	staging := newDir + ".partial"
	argv := etcdutlArgv(cfg, req, snapshot, staging)
	ans.EtcdutlArgv = argv
	changed := false
	switch {
	case !exists(newDir):
		if err := etcdutlSupports(cfg, req); err != nil {
			return false, err
		}
		sum, err := fileSHA256(snapshot)
		if errors.Is(err, fs.ErrNotExist) {
			return false, fail("precondition", "snapshot %s is not on this host (put-snapshot sends it)", snapshot)
		}
		if err != nil {
			return false, fail("failed", "cannot read snapshot %s: %v", snapshot, err)
		}
		if sum != req.SHA256 {
			return false, fail("precondition", "snapshot %s has sha256 %s, not %s: it was not used", snapshot, sum,
				req.SHA256)
		}
		info, _ := os.Stat(snapshot)
		if err := needSpace(filepath.Dir(newDir), uint64(info.Size())+128<<20, "the restored data"); err != nil {
			return false, err
		}
		j = journal{Token: req.Token, SHA256: req.SHA256, DataDir: newDir, Previous: previous, Phase: "restoring"}
		if err := saveJournal(cfg, req.Member, j); err != nil {
			return false, err
		}
		if err := os.RemoveAll(staging); err != nil { // an interrupted run's own output, never member data
			return false, fail("failed", "cannot clear %s: %v", staging, err)
		}
		if _, err := runTool(req.Timeout, argv, nil); err != nil {
			return false, err
		}
		if err := os.Rename(staging, newDir); err != nil {
			return false, fail("failed", "cannot rename %s to %s: %v", staging, newDir, err)
		}
		if err := syncDir(filepath.Dir(newDir)); err != nil {
			return false, err
		}
		j.Phase, changed = "restored", true
		if err := saveJournal(cfg, req.Member, j); err != nil {
			return changed, err
		}
	case !same || j.DataDir != newDir:
		return false, fail("precondition", "%s exists and is not this restore's output: pass another --data-dir",
			newDir)
	}
	switched, err := r.Switch(req, member, newDir)
	if err != nil {
		return changed, err
	}
	j.Phase = "switched"
	if err := saveJournal(cfg, req.Member, j); err != nil {
		return true, err
	}
	moved, err := moveAside(cfg, &j, req.Token)
	if err != nil {
		return true, err
	}
	j.Phase = "done"
	if err := saveJournal(cfg, req.Member, j); err != nil {
		return true, err
	}
	fillRestore(ans, j)
	ans.Detail = "restored snapshot " + filepath.Base(snapshot) + " into " + newDir
	return changed || switched || moved, nil
}

func fillRestore(ans *Answer, j journal) {
	ans.PreviousDataDir, ans.MovedAsideTo, ans.KeptReason = j.Previous, j.MovedTo, j.Kept
}

// restoredName: /var/lib/etcd → /var/lib/etcd.restored-<token tail> (an earlier suffix replaced).
func restoredName(previous, token string) string {
	base := filepath.Base(previous)
	if i := strings.Index(base, ".restored-"); i > 0 {
		base = base[:i]
	}
	return filepath.Join(filepath.Dir(previous), base+".restored-"+tokenTail(token))
}

func tokenTail(token string) string {
	if len(token) > 12 {
		return token[len(token)-12:]
	}
	return token
}

// resolvedUnder: the new directory's parent, symlinks resolved, is still under the allowed root.
func resolvedUnder(dir, root string) error {
	parent, err := filepath.EvalSymlinks(filepath.Dir(dir))
	if err != nil {
		return fail("precondition", "the parent of %s: %v", dir, err)
	}
	realRoot, err := filepath.EvalSymlinks(root)
	if err != nil {
		return fail("precondition", "--data-root %s: %v", root, err)
	}
	if parent != realRoot && !within(parent, realRoot) {
		return fail("precondition", "%s resolves to %s, outside --data-root %s", dir, parent, root)
	}
	return nil
}

// moveAside renames the previous data directory to <dir>.before-restore-<token tail>; it says why
// when it has to leave it where it is (outside the allowed root, a mount point).
func moveAside(cfg *Config, j *journal, token string) (bool, error) {
	prev := j.Previous
	switch {
	case prev == "" || prev == j.DataDir:
		return false, nil
	case j.MovedTo != "" && !exists(prev):
		return false, nil
	case !exists(prev):
		j.Kept = "it did not exist"
		return false, nil
	case !within(prev, cfg.DataRoot):
		j.Kept = "it is outside --data-root " + cfg.DataRoot
		return false, nil
	case isMountPoint(prev):
		j.Kept = "it is a mount point"
		return false, nil
	}
	aside := prev + ".before-restore-" + tokenTail(token)
	if exists(aside) {
		j.Kept = aside + " exists already"
		return false, nil
	}
	if err := os.Rename(prev, aside); err != nil {
		return false, fail("failed", "cannot move %s aside to %s: %v", prev, aside, err)
	}
	j.MovedTo, j.Kept = aside, ""
	return true, syncDir(filepath.Dir(prev))
}

func etcdutlArgv(cfg *Config, req *Request, snapshot, dataDir string) []string {
	argv := []string{cfg.Etcdutl, "snapshot", "restore", snapshot, "--name", req.Member,
		"--initial-cluster", req.InitialCluster, "--initial-cluster-token", req.Token,
		"--initial-advertise-peer-urls", req.PeerURL, "--data-dir", dataDir}
	if req.BumpRevision > 0 {
		argv = append(argv, "--bump-revision", strconv.FormatInt(req.BumpRevision, 10))
	}
	if req.MarkCompacted {
		argv = append(argv, "--mark-compacted")
	}
	return argv
}

// etcdutlSupports refuses, before anything changes, flags this host's etcdutl does not have
// (--bump-revision and --mark-compacted came in 3.5.10 and 3.6).
func etcdutlSupports(cfg *Config, req *Request) error {
	var wanted []string
	if req.BumpRevision > 0 {
		wanted = append(wanted, "--bump-revision")
	}
	if req.MarkCompacted {
		wanted = append(wanted, "--mark-compacted")
	}
	if len(wanted) == 0 {
		return nil
	}
	help, err := runTool(30*time.Second, []string{cfg.Etcdutl, "snapshot", "restore", "--help"}, nil)
	if err != nil {
		return err
	}
	for _, flag := range wanted {
		if !strings.Contains(help, flag+" ") {
			v, _ := etcdutlVersion(cfg, 30*time.Second)
			return fail("not_supported", "etcdutl %s (%s) has no %s (3.5.10 and later, 3.6): nothing was changed",
				v, cfg.Etcdutl, flag)
		}
	}
	return nil
}

var versionLine = regexp.MustCompile(`(?m)^etcdutl version:\s*(\S+)`)

func etcdutlVersion(cfg *Config, timeout time.Duration) (string, error) {
	out, err := runTool(timeout, []string{cfg.Etcdutl, "version"}, nil)
	if err != nil {
		return "", err
	}
	if m := versionLine.FindStringSubmatch(out); m != nil {
		return m[1], nil
	}
	return "", fmt.Errorf("etcdutl version printed no version")
}

var snapshotName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$`)

// snapshotPath: a file name in --snapshot-dir, or a path under it.
func snapshotPath(cfg *Config, s string) (string, error) {
	if snapshotName.MatchString(s) {
		return filepath.Join(cfg.SnapshotDir, s), nil
	}
	if err := underRoot(s, cfg.SnapshotDir); err != nil {
		return "", badInput("--snapshot: %v", err)
	}
	return s, nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// putSnapshot stores the snapshot that arrives on stdin (exactly --size bytes) in --snapshot-dir,
// and keeps it only when its sha256 is the one given: the bot's copy over the SSH connection.
func putSnapshot(cfg *Config, req *Request, stdin io.Reader, ans *Answer) (bool, error) {
	path := filepath.Join(cfg.SnapshotDir, req.Snapshot)
	ans.Snapshot = path
	if sum, err := fileSHA256(path); err == nil {
		if sum != req.SHA256 {
			return false, fail("precondition", "%s exists with sha256 %s, not %s: remove it or use another name", path,
				sum, req.SHA256)
		}
		ans.Detail = "the snapshot is here already"
		return false, nil
	}
	if err := ensureDir(cfg.SnapshotDir); err != nil {
		return false, err
	}
	if err := needSpace(cfg.SnapshotDir, uint64(req.Size)+16<<20, "the snapshot"); err != nil {
		return false, err
	}
	part := filepath.Join(cfg.SnapshotDir, "."+req.Snapshot+".part")
	f, err := os.OpenFile(part, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return false, fail("failed", "cannot create %s: %v", part, err)
	}
	defer os.Remove(part)
	defer f.Close()
	h := sha256.New()
	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := io.CopyN(io.MultiWriter(f, h), stdin, req.Size)
		done <- result{n, err}
	}()
	var res result
	select {
	case res = <-done:
	case <-time.After(req.Timeout):
		return false, fail("timeout", "the snapshot did not arrive within %s", req.Timeout)
	}
	switch {
	case res.err != nil && !errors.Is(res.err, io.EOF):
		return false, fail("failed", "receiving the snapshot: %v", res.err)
	case res.n < req.Size:
		return false, fail("failed", "stdin ended after %d of %d bytes: the snapshot was not kept", res.n, req.Size)
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != req.SHA256 {
		return false, fail("failed", "the snapshot arrived with sha256 %s, not %s: it was not kept", sum, req.SHA256)
	}
	if err := f.Sync(); err != nil {
		return false, fail("failed", "cannot sync %s: %v", part, err)
	}
	if err := os.Rename(part, path); err != nil {
		return false, fail("failed", "cannot keep %s: %v", path, err)
	}
	ans.Detail = fmt.Sprintf("received %d bytes, sha256 checked", req.Size)
	return true, syncDir(cfg.SnapshotDir)
}
