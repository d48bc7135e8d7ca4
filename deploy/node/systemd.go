package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// The systemd recipe (external etcd as a unit): `systemctl stop/start`; the member's parameters
// that the bot changes live in a drop-in the bot owns, <unit>.d/etcd-chatops.conf, as
// Environment= lines, so the unit file itself is never edited.

const (
	dropinName     = "etcd-chatops.conf"
	systemctlLimit = 30 * time.Second
)

type systemdUnit struct{ cfg *Config }

func (s *systemdUnit) dropinPath() string {
	return filepath.Join(s.cfg.UnitDir, s.cfg.Unit+".d", dropinName)
}

func (s *systemdUnit) systemctl(timeout time.Duration, args ...string) (string, error) {
	return runTool(timeout, append([]string{s.cfg.Systemctl}, args...), nil)
}

// activeState is `systemctl is-active`'s word (it exits non-zero for every state but active).
func (s *systemdUnit) activeState() (string, error) {
	out, err := s.systemctl(systemctlLimit, "is-active", s.cfg.Unit)
	if word := strings.TrimSpace(out); word != "" {
		return word, nil
	}
	return "", err
}

func wantedRunning(word string) bool {
	return word == "active" || word == "activating" || word == "reloading"
}

func (s *systemdUnit) dropinEnv() (map[string]string, error) {
	vars := map[string]string{}
	if !exists(s.dropinPath()) {
		return vars, nil
	}
	entries, err := readUnitFile(s.dropinPath())
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		if e.key == "Environment" {
			for _, w := range unitWords(e.value) {
				if k, v, ok := strings.Cut(w, "="); ok {
					vars[k] = v
				}
			}
		}
	}
	return vars, nil
}

func (s *systemdUnit) Describe(req *Request, ans *Answer) error {
	ans.Unit = s.cfg.Unit
	u, err := loadUnit(s.cfg)
	if err != nil {
		return err
	}
	word, err := s.activeState()
	if err != nil {
		return err
	}
	env, err := s.dropinEnv()
	if err != nil {
		return err
	}
	probe := probeFor(u.Param)
	answering := probe.Answering()
	ans.UnitState, ans.ProbeURL, ans.Answering = word, probe.URL, &answering
	ans.MemberName, ans.DataDir = u.Param("name"), u.Param("data-dir")
	ans.PID = findProcess(ans.DataDir)
	ans.State = stateWord(wantedRunning(word), answering)
	if exists(s.dropinPath()) {
		ans.DropIn, ans.DropInEnv = s.dropinPath(), env
		if req.ShowManifest {
			data, _ := os.ReadFile(s.dropinPath())
			ans.ManifestText = string(data)
		}
	}
	return nil
}

func (s *systemdUnit) Stop(req *Request, ans *Answer) (bool, error) {
	u, err := loadUnit(s.cfg)
	if err != nil {
		return false, err
	}
	if err := checkName(req, u.Param("name")); err != nil {
		return false, err
	}
	word, err := s.activeState()
	if err != nil {
		return false, err
	}
	changed := false
	var done []string
	if word != "inactive" && word != "failed" {
		if _, err := s.systemctl(req.Timeout, "stop", s.cfg.Unit); err != nil {
			return false, err
		}
		changed = true
		done = append(done, "systemctl stop "+s.cfg.Unit)
	}
	took, err := waitGone(probeFor(u.Param), u.Param("data-dir"), req.Timeout)
	if err != nil {
		return changed, err
	}
	ans.Detail = strings.Join(append(done, "the member stopped answering after "+took), "; ")
	return changed, nil
}

func (s *systemdUnit) Start(req *Request, stdin io.Reader, ans *Answer) (bool, error) {
	u, err := loadUnit(s.cfg)
	if err != nil {
		return false, err
	}
	changed := false
	var done []string
	if req.Join && u.Param("name") != req.Member {
		dataDir := req.DataDir
		if dataDir == "" {
			dataDir = u.Param("data-dir")
		}
		if dataDir == "" {
			return false, fail("precondition", "unit %s sets no data dir: pass --data-dir", s.cfg.Unit)
		}
		if hasMemberData(dataDir) {
			return false, fail("precondition", "data dir %s already holds member data: move it aside before a new "+
				"member joins there", dataDir)
		}
		listen := listenClientURLs(u.Param, req.ClientURLs)
		vars := map[string]string{"ETCD_NAME": req.Member, "ETCD_DATA_DIR": dataDir,
			"ETCD_INITIAL_CLUSTER": req.InitialCluster, "ETCD_INITIAL_CLUSTER_STATE": "existing",
			"ETCD_INITIAL_ADVERTISE_PEER_URLS": req.PeerURL, "ETCD_LISTEN_PEER_URLS": req.PeerURL,
			"ETCD_ADVERTISE_CLIENT_URLS": strings.Join(req.ClientURLs, ","),
			"ETCD_LISTEN_CLIENT_URLS":    strings.Join(listen, ",")}
		if _, err := s.writeDropin(u, vars); err != nil {
			return false, err
		}
		changed = true
		done = append(done, "wrote "+s.dropinPath()+" for the new member "+req.Member)
		if u, err = s.reloaded(vars); err != nil {
			return changed, err
		}
	} else if err := checkName(req, u.Param("name")); err != nil {
		return false, err
	}
	if err := refuseEmptyStart(req, u.Param("data-dir")); err != nil {
		return changed, err
	}
	word, err := s.activeState()
	if err != nil {
		return changed, err
	}
	if !wantedRunning(word) {
		if _, err := s.systemctl(systemctlLimit, "start", "--no-block", s.cfg.Unit); err != nil {
			return changed, err
		}
		changed = true
		done = append(done, "systemctl start "+s.cfg.Unit)
	}
	lastCheck := time.Now()
	took, err := waitAnswering(probeFor(u.Param), req.Timeout, func() error {
		if time.Since(lastCheck) < time.Second {
			return nil
		}
		lastCheck = time.Now()
		if w, _ := s.activeState(); w == "failed" {
			return fail("failed", "unit %s failed while starting (journalctl -u %s says why)", s.cfg.Unit, s.cfg.Unit)
		}
		return nil
	})
	if err != nil {
		return changed, err
	}
	ans.Detail = strings.Join(append(done, "the member answers after "+took), "; ")
	return changed, nil
}

func (s *systemdUnit) Current(req *Request, stdin io.Reader) (Member, error) {
	u, err := loadUnit(s.cfg)
	if err != nil {
		return Member{}, err
	}
	word, err := s.activeState()
	if err != nil {
		return Member{}, err
	}
	if word != "inactive" && word != "failed" {
		return Member{}, fail("precondition", "unit %s is %s: stop it first", s.cfg.Unit, word)
	}
	if err := checkName(req, u.Param("name")); err != nil {
		return Member{}, err
	}
	if u.Param("wal-dir") != "" {
		return Member{}, fail("not_supported", "unit %s sets a separate WAL directory: the restore does not place "+
			"one; restore this member by hand", s.cfg.Unit)
	}
	dataDir := u.Param("data-dir")
	if dataDir == "" {
		return Member{}, fail("precondition", "unit %s sets no data dir (ETCD_DATA_DIR or --data-dir): the node "+
			"cannot tell where the member's data is", s.cfg.Unit)
	}
	return Member{Name: u.Param("name"), DataDir: dataDir, Params: u.Param}, nil
}

func (s *systemdUnit) Switch(req *Request, member Member, dataDir string) (bool, error) {
	u, err := loadUnit(s.cfg)
	if err != nil {
		return false, err
	}
	vars := map[string]string{"ETCD_DATA_DIR": dataDir}
	clients := req.ClientURLs
	if len(clients) == 0 {
		clients = splitList(u.Param("advertise-client-urls"))
	}
	if req.Member != u.Param("name") || req.PeerURL != u.Param("initial-advertise-peer-urls") ||
		strings.Join(clients, ",") != u.Param("advertise-client-urls") {
		vars["ETCD_NAME"], vars["ETCD_INITIAL_CLUSTER"] = req.Member, req.InitialCluster
		vars["ETCD_INITIAL_CLUSTER_STATE"] = "new"
		vars["ETCD_INITIAL_ADVERTISE_PEER_URLS"], vars["ETCD_LISTEN_PEER_URLS"] = req.PeerURL, req.PeerURL
		vars["ETCD_ADVERTISE_CLIENT_URLS"] = strings.Join(clients, ",")
	}
	changed, err := s.writeDropin(u, vars)
	if err != nil {
		return false, err
	}
	_, err = s.reloaded(vars)
	return changed, err
}

// writeDropin sets vars in the bot's drop-in (keeping its other variables). It refuses when the
// unit would not let them through: an ExecStart flag etcd would refuse beside the variable, or an
// EnvironmentFile= that overrides Environment=.
func (s *systemdUnit) writeDropin(u *unitInfo, vars map[string]string) (bool, error) {
	for k, v := range vars {
		if strings.ContainsAny(v, "\"\\% \t\n") {
			return false, fail("failed", "%s=%q cannot be written as an Environment= line", k, v)
		}
		if _, ok := u.execFlag(flagName(k)); ok {
			return false, fail("precondition", "unit %s's ExecStart sets --%s: the systemd recipe passes it as %s in "+
				"%s; move the flag into an Environment= line", s.cfg.Unit, flagName(k), k, dropinName)
		}
		if _, ok := u.FromFiles[k]; ok {
			return false, fail("precondition", "an EnvironmentFile= of unit %s sets %s, which would override %s",
				s.cfg.Unit, k, dropinName)
		}
	}
	merged, err := s.dropinEnv()
	if err != nil {
		return false, err
	}
	before := renderDropin(merged)
	for k, v := range vars {
		merged[k] = v
	}
	after := renderDropin(merged)
	if before == after && exists(s.dropinPath()) {
		return false, nil
	}
	if err := ensureDir(filepath.Dir(s.dropinPath())); err != nil {
		return false, err
	}
	return true, writeAtomic(s.dropinPath(), []byte(after), 0o644)
}

func renderDropin(vars map[string]string) string {
	keys := make([]string, 0, len(vars))
	for k := range vars {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString("# Owned by etcd-chatops-node: it rewrites this file when it restores or adds the member.\n" +
		"# Every other setting of the unit stays in the unit file.\n[Service]\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "Environment=\"%s=%s\"\n", k, vars[k])
	}
	return b.String()
}

// reloaded runs daemon-reload (always: a run that wrote the drop-in may have ended before it) and
// checks that the unit now gives etcd what the drop-in says (no later drop-in overrides it).
func (s *systemdUnit) reloaded(vars map[string]string) (*unitInfo, error) {
	if _, err := s.systemctl(systemctlLimit, "daemon-reload"); err != nil {
		return nil, err
	}
	u, err := loadUnit(s.cfg)
	if err != nil {
		return nil, err
	}
	for k, v := range vars {
		if got := u.Env[k]; got != v {
			return nil, fail("precondition", "after writing %s the unit %s still gives %s=%s: a later drop-in "+
				"overrides it", dropinName, s.cfg.Unit, k, got)
		}
	}
	return u, nil
}
