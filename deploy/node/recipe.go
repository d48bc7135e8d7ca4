package main

import (
	"io"
	"os"
	"path/filepath"
	"time"
)

// Recipe is how a member runs on this host: a kubelet static pod or a systemd unit.
type Recipe interface {
	// Describe fills the answer with the member's state and configuration as they are now.
	Describe(req *Request, ans *Answer) error
	// Stop stops the member (and, static-pod with --with-apiserver, kube-apiserver) and waits
	// until it no longer answers; it reports whether it changed anything.
	Stop(req *Request, ans *Answer) (bool, error)
	// Start starts the member (a new one with --join) and waits until it answers.
	Start(req *Request, stdin io.Reader, ans *Answer) (bool, error)

	// What restore needs of a recipe.
	// Current is the member's configuration; it must be stopped. With req.TemplateStdin on a
	// host that has no configuration yet, it is derived from the surviving member's manifest.
	Current(req *Request, stdin io.Reader) (Member, error)
	// Switch points the member's configuration at dataDir (and at a new identity when the
	// request renames it); it reports whether it changed anything.
	Switch(req *Request, m Member, dataDir string) (bool, error)
}

// Member is what a recipe knows of the member's configuration.
type Member struct {
	Name    string
	DataDir string // on the host
	Params  Params
}

func newRecipe(cfg *Config) (Recipe, error) {
	if cfg.Recipe == "systemd" {
		return &systemdUnit{cfg: cfg}, nil
	}
	return &staticPod{cfg: cfg}, nil
}

// stateWord turns "configured to run" and "answers" into the state the bot reads.
func stateWord(wanted, answering bool) string {
	switch {
	case wanted && answering:
		return "running"
	case wanted:
		return "starting"
	case answering:
		return "stopping"
	}
	return "stopped"
}

// checkName refuses to act on a host whose member is another one (a wrong host mapping).
func checkName(req *Request, inConfig string) error {
	if inConfig == "" || inConfig == req.Member || (req.Replaces != "" && inConfig == req.Replaces) {
		return nil
	}
	return fail("precondition", "this host's etcd is member %s, not %s", inConfig, req.Member)
}

// hasMemberData: a data directory etcd has used holds member/ (its WAL and snapshots).
func hasMemberData(dir string) bool {
	info, err := os.Stat(filepath.Join(dir, "member"))
	return err == nil && info.IsDir()
}

// refuseEmptyStart: starting a member on a data directory without its data would bootstrap an
// empty member (or a new cluster) from the initial-cluster flags; a new member must say --join.
func refuseEmptyStart(req *Request, dataDir string) error {
	if req.Join || dataDir == "" || hasMemberData(dataDir) {
		return nil
	}
	return fail("precondition", "data dir %s holds no member data: starting would bootstrap an empty member; "+
		"restore it, or start a new member with --join", dataDir)
}

// waitGone waits until the member no longer answers and no etcd process runs on its data dir.
func waitGone(probe Probe, dataDir string, timeout time.Duration) (string, error) {
	start := time.Now()
	ok, _ := waitFor(start.Add(timeout), func() (bool, error) {
		return !probe.Answering() && findProcess(dataDir) == 0, nil
	})
	if !ok {
		return "", fail("timeout", "the member still runs %s after it was told to stop (probe %s, pid %d)",
			timeout, probe.URL, findProcess(dataDir))
	}
	return sinceText(start), nil
}

// waitAnswering waits until the member answers; check may end the wait early with an error.
func waitAnswering(probe Probe, timeout time.Duration, check func() error) (string, error) {
	if probe.URL == "" {
		return "", fail("precondition", "the member's configuration names no client or metrics URL to ask")
	}
	start := time.Now()
	ok, err := waitFor(start.Add(timeout), func() (bool, error) {
		if probe.Answering() {
			return true, nil
		}
		if check != nil {
			return false, check()
		}
		return false, nil
	})
	if err != nil {
		return "", err
	}
	if !ok {
		return "", fail("timeout", "the member does not answer %s after %s", probe.URL, timeout)
	}
	return sinceText(start), nil
}
