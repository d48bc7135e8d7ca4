package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

const usageLine = "etcd-chatops-node [--recipe static-pod|systemd] [path flags] " +
	"status|stop|start|restore|put-snapshot --member NAME [--fence N] [action flags] (deploy/node/README.md)"

// Config is how the node is laid out. Its administrator sets it (the forced command's
// argv, the sudoers line, or ETCD_CHATOPS_NODE_* variables); the bot cannot change it.
type Config struct {
	Recipe       string
	ManifestsDir string
	HoldingDir   string
	Unit         string
	UnitDir      string
	Systemctl    string
	Etcdutl      string
	StateDir     string
	DataRoot     string
	SnapshotDir  string
}

// Request is one action with its validated arguments.
type Request struct {
	Action  string
	Member  string
	Fence   int64
	Timeout time.Duration

	WithAPIServer bool // stop: kube-apiserver's manifest leaves too (a restore)
	APIServerOnly bool // stop: kube-apiserver's manifest leaves, etcd's stays (a restore's first stop)
	APIServer     bool // start: kube-apiserver's manifest goes back (the cluster is healthy)
	Join          bool // start: a new member joins a running cluster
	TemplateStdin bool // start --join / restore: a surviving member's etcd.yaml arrives on stdin
	ShowManifest  bool // status: include the manifest's text

	InitialCluster string
	PeerURL        string
	ClientURLs     []string
	DataDir        string
	Token          string
	Replaces       string // restore: the name the member had before (a renamed member)
	BumpRevision   int64
	MarkCompacted  bool

	Snapshot string
	SHA256   string
	Size     int64
}

var actions = []string{"status", "stop", "start", "restore", "put-snapshot"}

// changing actions take a fencing token.
func changing(action string) bool { return action != "status" }

type configFlag struct {
	name, env, def string
	field          func(*Config) *string
}

var configFlags = []configFlag{
	{"recipe", "RECIPE", "", func(c *Config) *string { return &c.Recipe }},
	{"manifests-dir", "MANIFESTS_DIR", "/etc/kubernetes/manifests", func(c *Config) *string { return &c.ManifestsDir }},
	{"holding-dir", "HOLDING_DIR", "/etc/kubernetes/etcd-chatops-held", func(c *Config) *string { return &c.HoldingDir }},
	{"unit", "UNIT", "etcd.service", func(c *Config) *string { return &c.Unit }},
	{"unit-dir", "UNIT_DIR", "/etc/systemd/system", func(c *Config) *string { return &c.UnitDir }},
	{"systemctl", "SYSTEMCTL", "systemctl", func(c *Config) *string { return &c.Systemctl }},
	{"etcdutl", "ETCDUTL", "etcdutl", func(c *Config) *string { return &c.Etcdutl }},
	{"state-dir", "STATE_DIR", "/var/lib/etcd-chatops-node", func(c *Config) *string { return &c.StateDir }},
	{"data-root", "DATA_ROOT", "/var/lib", func(c *Config) *string { return &c.DataRoot }},
	{"snapshot-dir", "SNAPSHOT_DIR", "", func(c *Config) *string { return &c.SnapshotDir }},
}

func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return fs
}

// parseConfig reads the configuration flags at the head of `args`; it returns the rest and the
// flags that were given there.
func parseConfig(args []string, cfg *Config) ([]string, map[string]string, error) {
	fs := newFlagSet("config")
	for _, f := range configFlags {
		fs.StringVar(f.field(cfg), f.name, *f.field(cfg), "")
	}
	if err := fs.Parse(args); err != nil {
		return nil, nil, flagError(err, "before the action")
	}
	given := map[string]string{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = f.Value.String() })
	return fs.Args(), given, nil
}

func flagError(err error, where string) *Failure {
	msg := err.Error()
	if rest, ok := strings.CutPrefix(msg, "flag provided but not defined: "); ok {
		return badInput("unknown flag --%s %s", strings.TrimLeft(rest, "-"), where)
	}
	return badInput("%s (%s)", msg, where)
}

// parse builds the configuration and the request from argv, the environment and, under an SSH
// forced command, SSH_ORIGINAL_COMMAND (the words the client asked for).
func parse(args []string, getenv func(string) string) (*Request, *Config, error) {
	cfg := &Config{}
	for _, f := range configFlags {
		*f.field(cfg) = f.def
		if v := getenv("ETCD_CHATOPS_NODE_" + f.env); v != "" {
			*f.field(cfg) = v
		}
	}
	rest, _, err := parseConfig(args, cfg)
	if err != nil {
		return nil, nil, err
	}
	if original := getenv("SSH_ORIGINAL_COMMAND"); original != "" {
		if len(rest) > 0 {
			return nil, nil, badInput("SSH_ORIGINAL_COMMAND is set: the forced command line itself may hold " +
				"only configuration flags, not an action")
		}
		words, err := splitForced(original)
		if err != nil {
			return nil, nil, err
		}
		words = dropPrefix(words)
		var given map[string]string
		pinned := *cfg
		rest, given, err = parseConfig(words, &pinned)
		if err != nil {
			return nil, nil, err
		}
		for name, value := range given { // the client may repeat the node's configuration, never change it
			if value != *fieldOf(cfg, name) {
				return nil, nil, badInput("--%s %s differs from this node's configuration (%s): the forced "+
					"command fixes it", name, value, *fieldOf(cfg, name))
			}
		}
	}
	if err := validateConfig(cfg); err != nil {
		return nil, cfg, err
	}
	if len(rest) == 0 {
		return nil, cfg, badInput("no action given")
	}
	req, err := parseAction(rest[0], rest[1:], getenv, cfg)
	return req, cfg, err
}

func fieldOf(cfg *Config, name string) *string {
	for _, f := range configFlags {
		if f.name == name {
			return f.field(cfg)
		}
	}
	panic("unknown config flag " + name)
}

var forcedWord = regexp.MustCompile(`^[A-Za-z0-9._/:=,@+\[\]-]+$`)

// splitForced splits the client's command into words. There is no quoting and no shell: a quote,
// `$`, `;`, `|`, a space inside a value or any other metacharacter is refused, never interpreted.
func splitForced(s string) ([]string, error) {
	words := strings.FieldsFunc(s, func(r rune) bool { return r == ' ' || r == '\t' })
	for _, w := range words {
		if !forcedWord.MatchString(w) {
			return nil, badInput("the command holds a character the node program does not take (%q): it takes "+
				"plain words only, no quoting or shell syntax", firstBadRune(w))
		}
	}
	return words, nil
}

func firstBadRune(w string) string {
	for _, r := range w {
		if !forcedWord.MatchString(string(r)) {
			return string(r)
		}
	}
	return w
}

// dropPrefix removes the launcher's argv prefix (`sudo -n`, the program's own path) that the client
// sends because it does not know a forced command replaces it.
func dropPrefix(words []string) []string {
	for len(words) > 0 {
		w := words[0]
		if w == "sudo" || w == "-n" || w == "--" || filepath.Base(w) == "etcd-chatops-node" {
			words = words[1:]
			continue
		}
		break
	}
	return words
}

func validateConfig(cfg *Config) error {
	if cfg.Recipe != "static-pod" && cfg.Recipe != "systemd" {
		if cfg.Recipe == "" {
			return badInput("no recipe: pass --recipe static-pod|systemd or set ETCD_CHATOPS_NODE_RECIPE")
		}
		return badInput("--recipe %q: not static-pod or systemd", cfg.Recipe)
	}
	if cfg.SnapshotDir == "" {
		cfg.SnapshotDir = filepath.Join(cfg.StateDir, "snapshots")
	}
	for _, d := range []struct{ name, value string }{{"manifests-dir", cfg.ManifestsDir},
		{"holding-dir", cfg.HoldingDir}, {"unit-dir", cfg.UnitDir}, {"state-dir", cfg.StateDir},
		{"data-root", cfg.DataRoot}, {"snapshot-dir", cfg.SnapshotDir}} {
		if err := cleanAbsolute(d.value); err != nil {
			return badInput("--%s: %v", d.name, err)
		}
	}
	if within(cfg.HoldingDir, cfg.ManifestsDir) || cfg.HoldingDir == cfg.ManifestsDir {
		return badInput("--holding-dir %s is inside --manifests-dir: the kubelet would still see what it holds",
			cfg.HoldingDir)
	}
	if !unitName.MatchString(cfg.Unit) {
		return badInput("--unit %q: not a unit name like etcd.service", cfg.Unit)
	}
	for _, e := range []struct{ name, value string }{{"systemctl", cfg.Systemctl}, {"etcdutl", cfg.Etcdutl}} {
		if !filepath.IsAbs(e.value) && !plainName.MatchString(e.value) {
			return badInput("--%s %q: an absolute path or a plain program name", e.name, e.value)
		}
	}
	return nil
}

var (
	memberName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)
	tokenRe    = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	sha256Re   = regexp.MustCompile(`^[0-9a-f]{64}$`)
	digits     = regexp.MustCompile(`^[0-9]{1,18}$`)
	pathChars  = regexp.MustCompile(`^[A-Za-z0-9._/+-]+$`)
	unitName   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9@._-]{0,200}\.service$`)
	plainName  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$`)
	dnsName    = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$`)
)

// actionFlags lists which flags each action takes (anything else is refused).
var actionFlags = map[string][]string{
	"status":       {"member", "timeout", "snapshot", "sha256", "show-manifest"},
	"stop":         {"member", "timeout", "fence", "with-apiserver", "apiserver-only"},
	"start":        {"member", "timeout", "fence", "apiserver", "join", "initial-cluster", "peer-url", "client-url", "data-dir", "template-stdin"},
	"restore":      {"member", "timeout", "fence", "snapshot", "sha256", "initial-cluster", "token", "peer-url", "client-url", "data-dir", "bump-revision", "mark-compacted", "replaces", "template-stdin"},
	"put-snapshot": {"member", "timeout", "fence", "snapshot", "sha256", "size"},
}

var boolFlags = map[string]bool{"with-apiserver": true, "apiserver-only": true, "apiserver": true, "join": true, "template-stdin": true,
	"show-manifest": true, "mark-compacted": true}

// envFlags: the action flags a launcher may also pass as environment variables.
var envFlags = map[string]string{"fence": "ETCD_CHATOPS_FENCE", "bump-revision": "ETCD_CHATOPS_BUMP_REVISION",
	"mark-compacted": "ETCD_CHATOPS_MARK_COMPACTED"}

func parseAction(action string, args []string, getenv func(string) string, cfg *Config) (*Request, error) {
	names, ok := actionFlags[action]
	if !ok {
		return nil, badInput("unknown action %q: one of %s", action, strings.Join(actions, ", "))
	}
	req := &Request{Action: action}
	fs := newFlagSet(action)
	values := map[string]*string{}
	bools := map[string]*bool{}
	for _, n := range names {
		if boolFlags[n] {
			bools[n] = fs.Bool(n, false, "")
		} else {
			values[n] = fs.String(n, "", "")
		}
	}
	if err := fs.Parse(args); err != nil {
		return req, flagError(err, "for "+action)
	}
	if fs.NArg() > 0 {
		return req, badInput("unexpected argument %q after the flags of %s", fs.Arg(0), action)
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	for name, env := range envFlags {
		if !slices.Contains(names, name) {
			continue
		}
		v := getenv(env)
		if v == "" {
			continue
		}
		if boolFlags[name] {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return req, badInput("%s=%q: not a boolean", env, v)
			}
			if given[name] && *bools[name] != b {
				return req, badInput("--%s and %s disagree", name, env)
			}
			*bools[name] = b
		} else {
			if given[name] && *values[name] != v {
				return req, badInput("--%s %s and %s=%s disagree", name, *values[name], env, v)
			}
			*values[name] = v
		}
		given[name] = true
	}
	str := func(n string) string {
		if p, ok := values[n]; ok {
			return *p
		}
		return ""
	}
	flagOn := func(n string) bool {
		if p, ok := bools[n]; ok {
			return *p
		}
		return false
	}

	member := str("member")
	if member == "" {
		return req, badInput("--member is required for %s", action)
	}
	if !memberName.MatchString(member) {
		return req, badInput("--member %q: a member name is 1-63 letters, digits, '.', '_' or '-'", member)
	}
	req.Member = member
	req.Timeout = 120 * time.Second
	if t := str("timeout"); t != "" {
		n, err := boundedInt(t, 1, 3600)
		if err != nil {
			return req, badInput("--timeout %q: %v (seconds)", t, err)
		}
		req.Timeout = time.Duration(n) * time.Second
	}
	if changing(action) {
		f := str("fence")
		if f == "" {
			return req, badInput("--fence is required for %s (or ETCD_CHATOPS_FENCE): a fencing token, a "+
				"non-negative integer", action)
		}
		n, err := boundedInt(f, 0, 999999999999999999)
		if err != nil {
			return req, badInput("--fence %q: %v", f, err)
		}
		req.Fence = n
	}
	req.WithAPIServer, req.APIServer = flagOn("with-apiserver"), flagOn("apiserver")
	req.APIServerOnly = flagOn("apiserver-only")
	req.WithAPIServer = req.WithAPIServer || req.APIServerOnly
	req.Join, req.TemplateStdin, req.ShowManifest = flagOn("join"), flagOn("template-stdin"), flagOn("show-manifest")
	req.MarkCompacted = flagOn("mark-compacted")
	if cfg.Recipe == "systemd" && (req.WithAPIServer || req.APIServer || req.TemplateStdin) {
		return req, badInput("--with-apiserver, --apiserver-only, --apiserver and --template-stdin belong to the "+
			"static-pod recipe; "+
			"this node runs the %s recipe", cfg.Recipe)
	}

	if v := str("peer-url"); v != "" {
		u, err := validURL(v)
		if err != nil {
			return req, badInput("--peer-url: %v", err)
		}
		req.PeerURL = u
	}
	if v := str("client-url"); v != "" {
		for _, part := range strings.Split(v, ",") {
			u, err := validURL(part)
			if err != nil {
				return req, badInput("--client-url: %v", err)
			}
			req.ClientURLs = append(req.ClientURLs, u)
		}
	}
	if v := str("initial-cluster"); v != "" {
		if err := validInitialCluster(v); err != nil {
			return req, badInput("--initial-cluster: %v", err)
		}
		req.InitialCluster = v
	}
	if v := str("data-dir"); v != "" {
		if err := underRoot(v, cfg.DataRoot); err != nil {
			return req, badInput("--data-dir: %v", err)
		}
		req.DataDir = v
	}
	if v := str("token"); v != "" {
		if !tokenRe.MatchString(v) {
			return req, badInput("--token %q: 1-128 letters, digits, '.', '_' or '-'", v)
		}
		req.Token = v
	}
	if v := str("replaces"); v != "" {
		if !memberName.MatchString(v) {
			return req, badInput("--replaces %q: not a member name", v)
		}
		req.Replaces = v
	}
	if v := str("bump-revision"); v != "" {
		n, err := boundedInt(v, 1, 1_000_000_000_000_000)
		if err != nil {
			return req, badInput("--bump-revision %q: %v", v, err)
		}
		req.BumpRevision = n
	}
	if v := str("sha256"); v != "" {
		v = strings.ToLower(v)
		if !sha256Re.MatchString(v) {
			return req, badInput("--sha256: 64 hex digits")
		}
		req.SHA256 = v
	}
	if v := str("snapshot"); v != "" {
		if action == "put-snapshot" && !snapshotName.MatchString(v) {
			return req, badInput("--snapshot %q: put-snapshot takes a file name (no directory)", v)
		}
		if _, err := snapshotPath(cfg, v); err != nil {
			return req, err
		}
		req.Snapshot = v
	}
	if v := str("size"); v != "" {
		n, err := boundedInt(v, 1, 1<<42)
		if err != nil {
			return req, badInput("--size %q: %v (bytes)", v, err)
		}
		req.Size = n
	}
	return req, requireFor(req)
}

// requireFor checks that the flags an action needs together are there.
func requireFor(req *Request) error {
	need := func(ok bool, what string) error {
		if !ok {
			return badInput("%s needs %s", req.Action, what)
		}
		return nil
	}
	switch req.Action {
	case "status":
		if req.SHA256 != "" && req.Snapshot == "" {
			return badInput("status: --sha256 goes with --snapshot")
		}
	case "start":
		joinOnly := req.InitialCluster != "" || req.PeerURL != "" || len(req.ClientURLs) > 0 || req.DataDir != "" ||
			req.TemplateStdin
		if !req.Join {
			if joinOnly {
				return badInput("start: --initial-cluster, --peer-url, --client-url, --data-dir and --template-stdin " +
					"describe a new member: add --join")
			}
			return nil
		}
		if req.APIServer {
			return badInput("start: --join and --apiserver do not go together (the apiserver goes back once the " +
				"cluster is healthy)")
		}
		for _, e := range []error{need(req.InitialCluster != "", "--initial-cluster"),
			need(req.PeerURL != "", "--peer-url"), need(len(req.ClientURLs) > 0, "--client-url")} {
			if e != nil {
				return e
			}
		}
		return memberInCluster(req)
	case "restore":
		for _, e := range []error{need(req.Snapshot != "", "--snapshot"), need(req.SHA256 != "", "--sha256"),
			need(req.InitialCluster != "", "--initial-cluster"), need(req.Token != "", "--token"),
			need(req.PeerURL != "", "--peer-url")} {
			if e != nil {
				return e
			}
		}
		if req.MarkCompacted && req.BumpRevision == 0 {
			return badInput("restore: --mark-compacted goes with --bump-revision (etcdutl requires it)")
		}
		return memberInCluster(req)
	case "put-snapshot":
		for _, e := range []error{need(req.Snapshot != "", "--snapshot"), need(req.SHA256 != "", "--sha256"),
			need(req.Size > 0, "--size")} {
			if e != nil {
				return e
			}
		}
	}
	return nil
}

// memberInCluster: etcd requires the member's own entry in --initial-cluster to be its peer URL.
func memberInCluster(req *Request) error {
	for _, entry := range strings.Split(req.InitialCluster, ",") {
		name, u, _ := strings.Cut(entry, "=")
		if name == req.Member {
			if u != req.PeerURL {
				return badInput("--initial-cluster gives %s the peer URL %s, not --peer-url %s", name, u, req.PeerURL)
			}
			return nil
		}
	}
	return badInput("--initial-cluster has no entry for --member %s", req.Member)
}

func boundedInt(s string, lo, hi int64) (int64, error) {
	if !digits.MatchString(s) {
		return 0, fmt.Errorf("not a whole number")
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < lo || n > hi {
		return 0, fmt.Errorf("out of range %d..%d", lo, hi)
	}
	return n, nil
}

// validURL accepts scheme://host:port only (http or https; an IP, [IPv6] or DNS name; no path,
// user, query or fragment) and returns it unchanged.
func validURL(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.User != nil || u.RawQuery != "" ||
		u.Fragment != "" || (u.Path != "" && u.Path != "/") || u.Opaque != "" {
		return "", fmt.Errorf("%q is not an http(s)://host:port URL", s)
	}
	host, port := u.Hostname(), u.Port()
	n, err := boundedInt(port, 1, 65535)
	if err != nil {
		return "", fmt.Errorf("%q has no valid port", s)
	}
	ip := net.ParseIP(host)
	if ip == nil && !dnsName.MatchString(host) {
		return "", fmt.Errorf("%q: the host is not an IP address or DNS name", s)
	}
	canonical := u.Scheme + "://" + net.JoinHostPort(host, strconv.FormatInt(n, 10))
	if strings.TrimSuffix(s, "/") != canonical {
		return "", fmt.Errorf("%q is not written as %s", s, canonical)
	}
	return canonical, nil
}

func validInitialCluster(s string) error {
	seen := map[string]bool{}
	for _, entry := range strings.Split(s, ",") {
		name, u, ok := strings.Cut(entry, "=")
		if !ok || !memberName.MatchString(name) {
			return fmt.Errorf("%q is not name=URL", entry)
		}
		if _, err := validURL(u); err != nil {
			return err
		}
		if seen[name] {
			return fmt.Errorf("%s appears twice", name)
		}
		seen[name] = true
	}
	return nil
}

func cleanAbsolute(p string) error {
	if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
		return fmt.Errorf("%q is not a clean absolute path", p)
	}
	if !pathChars.MatchString(p) {
		return fmt.Errorf("%q has characters other than letters, digits and ._/+-", p)
	}
	return nil
}

// within reports whether p lies strictly inside dir.
func within(p, dir string) bool {
	return strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

func underRoot(p, root string) error {
	if err := cleanAbsolute(p); err != nil {
		return err
	}
	if !within(p, root) {
		return fmt.Errorf("%s is not under the allowed root %s", p, root)
	}
	return nil
}
