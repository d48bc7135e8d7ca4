// etcd-chatops-node: the node side of etcd-chatops's `ssh` launcher.
//
// One small program with a fixed set of actions (status, stop, start, restore,
// put-snapshot) on the etcd member of this host, for two recipes: kubeadm's
// stacked etcd as a static pod, and external etcd as a systemd unit. It is
// meant to be the SSH forced command of the bot's key, so that key can do these
// actions and nothing else: every argument is validated, nothing is passed to a
// shell, and the answer is exactly one JSON line on stdout.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// version is the node program's version, reported by every answer.
var version = "0.1.0"

const (
	exitDone   = 0
	exitFailed = 1
	exitUsage  = 2
)

// Failure is an error with the machine-readable code the bot reads and the exit status.
type Failure struct {
	Code string // bad_input, fenced, busy, precondition, not_supported, timeout, failed
	Msg  string
}

func (f *Failure) Error() string { return f.Msg }

func (f *Failure) exit() int {
	if f.Code == "bad_input" {
		return exitUsage
	}
	return exitFailed
}

func badInput(format string, args ...any) *Failure {
	return &Failure{Code: "bad_input", Msg: fmt.Sprintf(format, args...)}
}

func fail(code, format string, args ...any) *Failure {
	return &Failure{Code: code, Msg: fmt.Sprintf(format, args...)}
}

// Answer is the one JSON line every run prints. Fields that do not apply are left out.
type Answer struct {
	OK          bool   `json:"ok"`
	Action      string `json:"action,omitempty"`
	Member      string `json:"member,omitempty"`
	Recipe      string `json:"recipe,omitempty"`
	NodeVersion string `json:"node_version"`
	Code        string `json:"code,omitempty"`
	Error       string `json:"error,omitempty"`
	Usage       string `json:"usage,omitempty"`

	Changed   *bool  `json:"changed,omitempty"`
	Detail    string `json:"detail,omitempty"`
	ElapsedMS int64  `json:"elapsed_ms"`

	// What the member looks like after the action (every successful answer).
	State      string `json:"state,omitempty"` // running, starting, stopping, stopped
	Answering  *bool  `json:"answering,omitempty"`
	ProbeURL   string `json:"probe_url,omitempty"`
	PID        int    `json:"pid,omitempty"`
	MemberName string `json:"member_in_config,omitempty"` // the name the manifest or unit gives etcd
	DataDir    string `json:"data_dir,omitempty"`
	Fence      *int64 `json:"fence,omitempty"` // the newest fencing token seen for the member

	// static-pod
	Manifest     string `json:"manifest,omitempty"` // present, held, absent
	ManifestPath string `json:"manifest_path,omitempty"`
	ManifestText string `json:"manifest_text,omitempty"` // status --show-manifest
	APIServer    string `json:"apiserver,omitempty"`     // present, held, absent

	// systemd
	Unit      string            `json:"unit,omitempty"`
	UnitState string            `json:"unit_state,omitempty"` // systemctl is-active's word
	DropIn    string            `json:"dropin,omitempty"`     // its path when it exists
	DropInEnv map[string]string `json:"dropin_env,omitempty"`

	// status
	Etcdutl        string `json:"etcdutl,omitempty"`
	EtcdutlVersion string `json:"etcdutl_version,omitempty"`
	EtcdutlError   string `json:"etcdutl_error,omitempty"`
	Snapshot       string `json:"snapshot,omitempty"`         // its path on this host
	SnapshotOK     *bool  `json:"snapshot_present,omitempty"` // present with the sha256 asked for

	// restore
	PreviousDataDir string   `json:"previous_data_dir,omitempty"`
	MovedAsideTo    string   `json:"previous_moved_to,omitempty"`
	KeptReason      string   `json:"previous_kept,omitempty"` // why the previous data dir stayed where it was
	EtcdutlArgv     []string `json:"etcdutl_argv,omitempty"`
}

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdin, os.Stdout))
}

// run parses, performs the action and prints one JSON line; it returns the exit status.
func run(args []string, getenv func(string) string, stdin io.Reader, stdout io.Writer) int {
	started := time.Now()
	ans := Answer{NodeVersion: version}
	req, cfg, err := parse(args, getenv)
	if req != nil {
		ans.Action, ans.Member = req.Action, req.Member
	}
	if cfg != nil {
		ans.Recipe = cfg.Recipe
	}
	if err == nil {
		err = perform(cfg, req, stdin, &ans)
	}
	ans.ElapsedMS = time.Since(started).Milliseconds()
	code := exitDone
	if err != nil {
		var f *Failure
		if !errors.As(err, &f) {
			f = &Failure{Code: "failed", Msg: err.Error()}
		}
		ans = Answer{OK: false, Action: ans.Action, Member: ans.Member, Recipe: ans.Recipe, NodeVersion: version,
			Code: f.Code, Error: oneLine(f.Msg), ElapsedMS: ans.ElapsedMS, EtcdutlArgv: ans.EtcdutlArgv}
		if f.Code == "bad_input" {
			ans.Usage = usageLine
		}
		code = f.exit()
	} else {
		ans.OK = true
	}
	line, merr := json.Marshal(ans)
	if merr != nil { // cannot happen with these field types; still one line
		line = []byte(`{"ok":false,"code":"failed","error":"could not encode the answer"}`)
		code = exitFailed
	}
	fmt.Fprintln(stdout, string(line))
	return code
}

// oneLine keeps an error to one line of bounded length (etcdutl and systemctl can say a lot).
func oneLine(s string) string {
	s = strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " / ")), " ")
	if len(s) > 600 {
		s = s[:600] + "…"
	}
	return s
}

func perform(cfg *Config, req *Request, stdin io.Reader, ans *Answer) error {
	r, err := newRecipe(cfg)
	if err != nil {
		return err
	}
	if req.Action == "status" {
		return status(cfg, r, req, ans)
	}
	unlock, err := lockHost(cfg, req.Timeout)
	if err != nil {
		return err
	}
	defer unlock()
	seen, err := checkFence(cfg, req.Member, req.Fence)
	if err != nil {
		return err
	}
	ans.Fence = &seen
	changed := false
	switch req.Action {
	case "stop":
		changed, err = r.Stop(req, ans)
	case "start":
		changed, err = r.Start(req, stdin, ans)
	case "restore":
		changed, err = restore(cfg, r, req, stdin, ans)
	case "put-snapshot":
		changed, err = putSnapshot(cfg, req, stdin, ans)
	}
	if err != nil {
		return err
	}
	ans.Changed = &changed
	if req.Action != "put-snapshot" {
		return r.Describe(req, ans)
	}
	return nil
}

func status(cfg *Config, r Recipe, req *Request, ans *Answer) error {
	if err := r.Describe(req, ans); err != nil {
		return err
	}
	if seen, ok := fenceSeen(cfg, req.Member); ok {
		ans.Fence = &seen
	}
	ans.Etcdutl = cfg.Etcdutl
	if v, err := etcdutlVersion(cfg, min(req.Timeout, 30*time.Second)); err != nil {
		ans.EtcdutlError = err.Error()
	} else {
		ans.EtcdutlVersion = v
	}
	if req.Snapshot != "" {
		path, err := snapshotPath(cfg, req.Snapshot)
		if err != nil {
			return err
		}
		ans.Snapshot = path
		present := false
		if req.SHA256 != "" {
			sum, err := fileSHA256(path)
			present = err == nil && sum == req.SHA256
		} else {
			_, err := os.Stat(path)
			present = err == nil
		}
		ans.SnapshotOK = &present
	}
	return nil
}
