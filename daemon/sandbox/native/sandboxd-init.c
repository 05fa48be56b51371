/* sandboxd-init: PID 1 of a sandbox, in C. It starts what the daemon asks for, reaps every
 * process that dies in the sandbox, kills an exec's whole tree at its deadline, and leaves each
 * exec's output and exit status in the runtime directory: what daemon/sandbox/supervisor.py
 * does, message for message (daemon/protocol.py draws the exchange).
 *
 * Runs in: B, PID 1 of the sandbox's PID namespace, in its mount, UTS, IPC and network
 * namespaces, host root in the host's user namespace. daemon/sandbox/zygote.py execs it once
 * the root is built and pivoted into, with everything it needs from the host as open fds
 * described by a JSON config on fd argv[1] (see read_config). It never blocks: every fd it
 * polls is non-blocking, and what the daemon is too slow to take waits in a bounded outbox.
 *
 *   sandboxd-init CONFIG_FD      run as the supervisor
 *   sandboxd-init --parse-only   read protocol lines on stdin, print how each decodes (tests)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "json.h"

#define PROTOCOL_VERSION 1
#define MAIN_EXEC "main"
#define READ_CHUNK 65536
#define OUTBOX_LIMIT (8u << 20) /* past it, live output is dropped (never status messages) */
#define INBOX_LIMIT (64u << 20)
#define INPUT_LIMIT (1u << 20) /* stdin bytes waiting for a process that does not read them */
#define DRAIN_POLL_MS 5        /* how often a killed exec's cgroup is checked for stragglers */
#define PASSWD_LIMIT (1 << 20)
#define EXIT_NOT_EXECUTABLE 126
#define EXIT_NOT_FOUND 127
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define SETUP_REPORT_WAIT_MS 30000

/* -- what the zygote hands over ------------------------------------------------------------ */

struct config {
    int listener, run, tree, memory, userns, ptmx, log, seccomp;
    bool memory_per_exec;
    long long uid_base; /* -1: no user namespace */
    long long id_range; /* the ids 0..id_range-1 the user namespace maps */
    unsigned long long output_limit, log_limit, keep_caps;
    int cap_last;
    char **cmd; /* NULL: no main command */
    struct json *env; /* the sandbox's env (an object), replaced by CONFIGURE */
    struct sock_fprog filter;
};

/* -- the state ----------------------------------------------------------------------------- */

struct logw { /* the main command's log of one stream (daemon/sandbox/logfile.py) */
    int fd;
    const char *name;
    unsigned long long kept, size;
};

struct stream {
    const char *name;
    int fd;      /* the read end (a pipe, or the pty's master); -1 once at its end */
    int file_fd; /* the mailbox file; -1 once the exec has ended */
    unsigned long long total;
    bool truncated;
    struct logw *log;
};

struct exec {
    char id[65];
    pid_t pid;
    struct stream out, err;
    int stdin_fd; /* kept open for input: a pipe, or the pty's master; -1 */
    bool tty, subscribed, timed_out, reaped, close_stdin_after_input, want_write;
    int wait_status;
    struct buf pending_input;
    long long oom_kills_before;
    bool has_deadline;
    struct timespec deadline;
};

static struct config cfg;
static int execs_fd, sigchld_fd;
static int conn = -1;
static struct buf inbox, outbox;
static struct exec **running; /* by start order */
static size_t n_running;
static int *draining; /* output fds of ended execs whose children still hold them */
static size_t n_draining;
static char **lingering; /* cgroups of ended execs whose children live on */
static size_t n_lingering;
static pid_t main_pid;
static bool main_started;

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (p == NULL)
        abort();
    return p;
}

static void *xrealloc(void *p, size_t size)
{
    p = realloc(p, size ? size : 1);
    if (p == NULL)
        abort();
    return p;
}

static char *xstrdup(const char *s)
{
    char *d = strdup(s);
    if (d == NULL)
        abort();
    return d;
}

/* What went wrong, as Python words an OSError: "[Errno N] text". */
static void os_error(char *out, size_t size, int number)
{
    snprintf(out, size, "[Errno %d] %s", number, strerror(number));
}

static const char *signal_name(int number, char *scratch, size_t size)
{
    static const char *const names[] = {
        NULL, "SIGHUP", "SIGINT", "SIGQUIT", "SIGILL", "SIGTRAP", "SIGABRT", "SIGBUS", "SIGFPE",
        "SIGKILL", "SIGUSR1", "SIGSEGV", "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTERM", "SIGSTKFLT",
        "SIGCHLD", "SIGCONT", "SIGSTOP", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGURG", "SIGXCPU",
        "SIGXFSZ", "SIGVTALRM", "SIGPROF", "SIGWINCH", "SIGIO", "SIGPWR", "SIGSYS"};
    if (number > 0 && number < (int)(sizeof(names) / sizeof(names[0])))
        return names[number];
    if (number == 34)
        return "SIGRTMIN";
    if (number == 64)
        return "SIGRTMAX";
    snprintf(scratch, size, "SIG%d", number);
    return scratch;
}

static double now_wall(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static bool valid_exec_id(const char *id, size_t len)
{
    if (len == 0 || len > 64)
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = id[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-'))
            return false;
    }
    return true;
}

static int write_file_at(int dir_fd, const char *name, const char *value)
{
    int fd = openat(dir_fd, name, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, value, strlen(value));
    int saved = errno;
    close(fd);
    errno = saved;
    return n < 0 ? -1 : 0;
}

static ssize_t read_file_at(int dir_fd, const char *name, char *out, size_t size)
{
    int fd = openat(dir_fd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, out, size - 1);
    close(fd);
    if (n >= 0)
        out[n] = '\0';
    return n;
}

static void write_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        data += n;
        len -= (size_t)n;
    }
}

/* -- messages ------------------------------------------------------------------------------ */

static void flush(void);
static void drop_connection(void);

/* Queue one message (a JSON object without its closing brace in `m`) for the daemon. */
static void send_message(struct buf *m, bool is_output)
{
    buf_str(m, "}\n");
    if (conn >= 0 && !(is_output && outbox.len > OUTBOX_LIMIT)) {
        buf_add(&outbox, m->data, m->len);
        flush();
    }
    buf_free(m);
}

static void begin(struct buf *m, const char *type)
{
    buf_printf(m, "{\"type\":\"%s\"", type);
}

static void field_string(struct buf *m, const char *key, const char *value)
{
    buf_printf(m, ",\"%s\":", key);
    if (value == NULL)
        buf_str(m, "null");
    else
        buf_json_string(m, value, strlen(value));
}

static void send_error(const char *id, const char *message)
{
    struct buf m = {0};
    begin(&m, "error");
    field_string(&m, "id", id);
    field_string(&m, "message", message);
    send_message(&m, false);
}

static void send_started(const char *id, pid_t pid)
{
    struct buf m = {0};
    begin(&m, "started");
    field_string(&m, "id", id);
    if (pid > 0)
        buf_printf(&m, ",\"pid\":%d", (int)pid);
    else
        buf_str(&m, ",\"pid\":null");
    send_message(&m, false);
}

struct status {
    int exit_code; /* -1: none (killed by a signal) */
    const char *signal;
    bool timed_out, stdout_truncated, stderr_truncated, oom_killed;
    double finished_at;
    long long oom_kills; /* kills its memory cgroup counted while it ran, each told once */
};

/* OOM kills already told with an exec's status: on a sandbox-wide count (cgroup v1), the main
 * cmd's status leaves them out. */
static long long oom_kills_reported;

static void status_json(struct buf *m, const struct status *s)
{
    if (s->exit_code >= 0)
        buf_printf(m, "{\"exit_code\": %d, \"signal\": null", s->exit_code);
    else
        buf_printf(m, "{\"exit_code\": null, \"signal\": \"%s\"", s->signal);
    buf_printf(m,
               ", \"timed_out\": %s, \"stdout_truncated\": %s, \"stderr_truncated\": %s, "
               "\"finished_at\": %.6f, \"oom_killed\": %s, \"oom_kills\": %lld}",
               s->timed_out ? "true" : "false", s->stdout_truncated ? "true" : "false",
               s->stderr_truncated ? "true" : "false", s->finished_at,
               s->oom_killed ? "true" : "false", s->oom_kills);
}

/* status.json appears whole or not at all: written aside, then renamed into place. */
static int write_status(const char *id, const struct status *s)
{
    char tmp[128], final[128];
    struct buf m = {0};
    snprintf(tmp, sizeof(tmp), "%s/status.json.tmp", id);
    snprintf(final, sizeof(final), "%s/status.json", id);
    status_json(&m, s);
    int fd = openat(execs_fd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        buf_free(&m);
        return -1;
    }
    write_all(fd, m.data, m.len);
    close(fd);
    buf_free(&m);
    return renameat(execs_fd, tmp, execs_fd, final);
}

static void send_exited(const char *id, const struct status *s)
{
    struct buf m = {0};
    begin(&m, "exited");
    field_string(&m, "id", id);
    buf_str(&m, ",\"status\":");
    status_json(&m, s);
    send_message(&m, false);
}

/* -- the daemon's connection --------------------------------------------------------------- */

static void flush(void)
{
    while (conn >= 0 && outbox.len > 0) {
        ssize_t sent = send(conn, outbox.data, outbox.len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                drop_connection();
            return;
        }
        buf_consume(&outbox, (size_t)sent);
    }
}

static void drop_connection(void)
{
    if (conn >= 0) {
        close(conn);
        conn = -1;
    }
}

static void finished_ids(struct buf *m)
{
    int fd = dup(execs_fd);
    DIR *dir = fd >= 0 ? fdopendir(fd) : NULL;
    bool first = true;
    buf_str(m, ",\"finished\":[");
    if (dir != NULL) {
        rewinddir(dir);
        struct dirent *entry;
        while ((entry = readdir(dir)) != NULL) {
            char path[300];
            struct stat st;
            if (entry->d_name[0] == '.')
                continue;
            snprintf(path, sizeof(path), "%s/status.json", entry->d_name);
            if (fstatat(execs_fd, path, &st, 0) == 0) {
                buf_str(m, first ? "" : ",");
                buf_json_string(m, entry->d_name, strlen(entry->d_name));
                first = false;
            }
        }
        closedir(dir);
    } else if (fd >= 0) {
        close(fd);
    }
    buf_str(m, "]");
}

struct exec_request {
    const char *id;
    char **cmd;
    const struct json *env; /* an object */
    const char *cwd;
    long long uid, gid; /* gid -1: the uid's primary group */
    const char *stdin_data;
    size_t stdin_len;
    bool has_timeout;
    double timeout;
    bool interactive, tty;
    long long rows, cols; /* 0: none given */
};

static void start(const struct exec_request *req);

static void on_accept(void)
{
    int fd = accept4(cfg.listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0)
        return;
    drop_connection(); /* a restarted daemon: the new connection wins */
    conn = fd;
    inbox.len = outbox.len = 0;
    struct buf m = {0};
    begin(&m, "hello");
    buf_printf(&m, ",\"version\":%d,\"running\":{", PROTOCOL_VERSION);
    bool first = true;
    for (size_t i = 0; i < n_running; i++) {
        running[i]->subscribed = false;
        if (running[i]->reaped)
            continue;
        buf_str(&m, first ? "" : ",");
        buf_json_string(&m, running[i]->id, strlen(running[i]->id));
        buf_printf(&m, ":%d", (int)running[i]->pid);
        first = false;
    }
    buf_str(&m, "}");
    finished_ids(&m);
    send_message(&m, false);
    if (cfg.cmd != NULL && !main_started) {
        /* Only now: a main cmd that ends at once must find the daemon listening. */
        struct json empty = {.kind = JSON_OBJECT};
        struct exec_request req = {.id = MAIN_EXEC, .cmd = cfg.cmd, .env = &empty, .cwd = "/",
                                   .uid = 0, .gid = -1};
        start(&req);
    }
}

/* -- decoding what the daemon sends -------------------------------------------------------- */

struct field_spec {
    const char *name;
    bool required;
};

/* Exactly the fields of the message type (as protocol.decode checks): else an error text. */
static bool check_fields(const struct json *msg, const char *type, const struct field_spec *spec,
                         char *error, size_t size)
{
    for (size_t i = 0; i < msg->count; i++) {
        const char *key = msg->keys[i];
        bool known = strcmp(key, "type") == 0;
        for (const struct field_spec *f = spec; f->name != NULL && !known; f++)
            known = strcmp(key, f->name) == 0;
        if (!known) {
            snprintf(error, size, "%s has no field %s", type, key);
            return false;
        }
    }
    for (const struct field_spec *f = spec; f->name != NULL; f++) {
        if (f->required && json_get(msg, f->name) == NULL) {
            snprintf(error, size, "%s lacks the field %s", type, f->name);
            return false;
        }
    }
    return true;
}

static const char *get_string(const struct json *msg, const char *key, bool *ok)
{
    const struct json *v = json_get(msg, key);
    if (v == NULL || v->kind == JSON_NULL)
        return NULL;
    if (v->kind != JSON_STRING || strlen(v->string) != v->length)
        *ok = false;
    return v->kind == JSON_STRING ? v->string : NULL;
}

static long long get_int(const struct json *msg, const char *key, long long absent, bool *ok)
{
    const struct json *v = json_get(msg, key);
    if (v == NULL || v->kind == JSON_NULL)
        return absent;
    if (v->kind == JSON_BOOL)
        return v->boolean;
    if (v->kind != JSON_NUMBER || !v->integral) {
        *ok = false;
        return absent;
    }
    return v->integer;
}

static bool get_bool(const struct json *msg, const char *key, bool *ok)
{
    const struct json *v = json_get(msg, key);
    if (v == NULL || v->kind == JSON_NULL)
        return false;
    if (v->kind != JSON_BOOL) {
        *ok = false;
        return false;
    }
    return v->boolean;
}

/* An object of strings (an env), or NULL if it is not one. */
static bool string_map(const struct json *v)
{
    if (v == NULL || v->kind != JSON_OBJECT)
        return false;
    for (size_t i = 0; i < v->count; i++)
        if (v->items[i].kind != JSON_STRING || strlen(v->items[i].string) != v->items[i].length ||
            strchr(v->keys[i], '=') != NULL || v->keys[i][0] == '\0')
            return false;
    return true;
}

/* A list of strings as a NULL-terminated argv (strings borrowed from the tree), or NULL. */
static char **string_list(const struct json *v)
{
    if (v == NULL || v->kind != JSON_ARRAY || v->count == 0)
        return NULL;
    char **argv = xcalloc(v->count + 1, sizeof(char *));
    for (size_t i = 0; i < v->count; i++) {
        if (v->items[i].kind != JSON_STRING || strlen(v->items[i].string) != v->items[i].length) {
            free(argv);
            return NULL;
        }
        argv[i] = v->items[i].string;
    }
    return argv;
}

static const struct field_spec EXEC_FIELDS[] = {
    {"id", true}, {"cmd", true}, {"env", true}, {"cwd", true}, {"uid", true}, {"gid", true},
    {"stdin", false}, {"timeout", false}, {"interactive", false}, {"tty", false},
    {"rows", false}, {"cols", false}, {NULL, false}};
static const struct field_spec ID_FIELDS[] = {{"id", true}, {NULL, false}};
static const struct field_spec SIGNAL_FIELDS[] = {{"id", true}, {"signal", true}, {NULL, false}};
static const struct field_spec INPUT_FIELDS[] = {
    {"id", true}, {"data", true}, {"eof", false}, {NULL, false}};
static const struct field_spec RESIZE_FIELDS[] = {
    {"id", true}, {"rows", true}, {"cols", true}, {NULL, false}};
static const struct field_spec CONFIGURE_FIELDS[] = {
    {"hostname", true}, {"env", true}, {NULL, false}};

/* A decoded request: the tree it points into, and its parts checked. */
struct request {
    struct json *tree;
    const char *type;
    const char *id;
    struct exec_request exec;
    long long number; /* SIGNAL's signal */
    long long rows, cols;
    struct buf data; /* INPUT's decoded bytes */
    bool eof;
    const char *hostname;
    const struct json *env;
};

static void request_free(struct request *r)
{
    free(r->exec.cmd);
    buf_free(&r->data);
    json_free(r->tree);
    memset(r, 0, sizeof(*r));
}

/* Decode one line as a message the supervisor takes; false with the reason in `error`. */
static bool decode(const char *line, size_t len, struct request *r, char *error, size_t size)
{
    const char *why = NULL;
    bool ok = true;
    memset(r, 0, sizeof(*r));
    r->tree = json_parse(line, len, &why);
    if (r->tree == NULL) {
        snprintf(error, size, "not a JSON line: %s", why);
        return false;
    }
    if (r->tree->kind != JSON_OBJECT) {
        snprintf(error, size, "a message must be a JSON object");
        return false;
    }
    const struct json *type = json_get(r->tree, "type");
    static const char *const known[] = {"spawn", "spawned", "setup_error", "hello", "started",
                                        "exited", "error", "subscribed", "output", NULL};
    if (type == NULL || type->kind != JSON_STRING || strlen(type->string) != type->length) {
        snprintf(error, size, "unknown message type");
        return false;
    }
    r->type = type->string;
    const struct field_spec *spec = NULL;
    if (strcmp(r->type, "exec") == 0)
        spec = EXEC_FIELDS;
    else if (strcmp(r->type, "signal") == 0)
        spec = SIGNAL_FIELDS;
    else if (strcmp(r->type, "subscribe") == 0 || strcmp(r->type, "unsubscribe") == 0)
        spec = ID_FIELDS;
    else if (strcmp(r->type, "input") == 0)
        spec = INPUT_FIELDS;
    else if (strcmp(r->type, "resize") == 0)
        spec = RESIZE_FIELDS;
    else if (strcmp(r->type, "configure") == 0)
        spec = CONFIGURE_FIELDS;
    if (spec == NULL) {
        for (size_t i = 0; known[i] != NULL; i++)
            if (strcmp(r->type, known[i]) == 0) {
                snprintf(error, size, "unexpected message %.32s", r->type);
                return false;
            }
        snprintf(error, size, "unknown message type '%.64s'", r->type);
        return false;
    }
    if (!check_fields(r->tree, r->type, spec, error, size))
        return false;
    if (spec == CONFIGURE_FIELDS) {
        r->hostname = get_string(r->tree, "hostname", &ok);
        r->env = json_get(r->tree, "env");
        if (!ok || r->hostname == NULL || !string_map(r->env)) {
            snprintf(error, size, "configure: hostname must be a string, env strings");
            return false;
        }
        return true;
    }
    r->id = get_string(r->tree, "id", &ok);
    if (!ok || r->id == NULL) {
        snprintf(error, size, "%s: id must be a string", r->type);
        return false;
    }
    if (spec == SIGNAL_FIELDS) {
        r->number = get_int(r->tree, "signal", -1, &ok);
        if (!ok || r->number < 0 || r->number > 64) {
            snprintf(error, size, "[Errno %d] %s", EINVAL, strerror(EINVAL));
            return false;
        }
    } else if (spec == RESIZE_FIELDS) {
        r->rows = get_int(r->tree, "rows", -1, &ok);
        r->cols = get_int(r->tree, "cols", -1, &ok);
        if (!ok || r->rows < 0 || r->rows > 65535 || r->cols < 0 || r->cols > 65535) {
            snprintf(error, size, "resize: rows and cols must be 0..65535");
            return false;
        }
    } else if (spec == INPUT_FIELDS) {
        const char *data = get_string(r->tree, "data", &ok);
        r->eof = get_bool(r->tree, "eof", &ok);
        if (!ok || data == NULL) {
            snprintf(error, size, "input: data must be a string");
            return false;
        }
        if (base64_decode(&r->data, data, strlen(data)) < 0) {
            snprintf(error, size, "Incorrect padding");
            return false;
        }
    } else if (spec == EXEC_FIELDS) {
        struct exec_request *e = &r->exec;
        e->id = r->id;
        e->cmd = string_list(json_get(r->tree, "cmd"));
        e->env = json_get(r->tree, "env");
        e->cwd = get_string(r->tree, "cwd", &ok);
        e->uid = get_int(r->tree, "uid", -1, &ok);
        e->gid = get_int(r->tree, "gid", -1, &ok);
        const struct json *in = json_get(r->tree, "stdin");
        if (in != NULL && in->kind == JSON_STRING) {
            e->stdin_data = in->string;
            e->stdin_len = in->length;
        } else if (in != NULL && in->kind != JSON_NULL) {
            ok = false;
        }
        const struct json *timeout = json_get(r->tree, "timeout");
        if (timeout != NULL && timeout->kind == JSON_NUMBER) {
            e->has_timeout = true;
            e->timeout = timeout->number;
        } else if (timeout != NULL && timeout->kind != JSON_NULL) {
            ok = false;
        }
        e->interactive = get_bool(r->tree, "interactive", &ok);
        e->tty = get_bool(r->tree, "tty", &ok);
        e->rows = get_int(r->tree, "rows", 0, &ok);
        e->cols = get_int(r->tree, "cols", 0, &ok);
        if (!ok || e->cmd == NULL || !string_map(e->env) || e->cwd == NULL || e->uid < 0 ||
            e->uid > 0xFFFFFFFELL || e->gid < -1 || e->gid > 0xFFFFFFFELL || e->rows < 0 ||
            e->rows > 65535 || e->cols < 0 || e->cols > 65535) {
            snprintf(error, size, "exec: a field has the wrong type or range");
            return false;
        }
    }
    return true;
}

/* -- starting an exec ---------------------------------------------------------------------- */

static struct exec *find_exec(const char *id)
{
    for (size_t i = 0; i < n_running; i++)
        if (strcmp(running[i]->id, id) == 0)
            return running[i];
    return NULL;
}

static long long oom_kills(const char *leaf)
{
    static const char *const counters[] = {"memory.events", "memory.oom_control"};
    if (cfg.memory < 0)
        return 0;
    for (size_t i = 0; i < 2; i++) {
        char path[128], text[4096];
        snprintf(path, sizeof(path), "%s%s%s", cfg.memory_per_exec ? leaf : "",
                 cfg.memory_per_exec ? "/" : "", counters[i]);
        if (read_file_at(cfg.memory, path, text, sizeof(text)) < 0)
            continue;
        for (char *line = strtok(text, "\n"); line != NULL; line = strtok(NULL, "\n"))
            if (strncmp(line, "oom_kill ", 9) == 0)
                return atoll(line + 9);
        return 0;
    }
    return 0;
}

static bool populated(const char *leaf)
{
    char path[128], text[4096];
    snprintf(path, sizeof(path), "%s/cgroup.events", leaf);
    if (read_file_at(cfg.tree, path, text, sizeof(text)) < 0)
        return false;
    return strstr(text, "populated 1") != NULL;
}

static bool remove_leaf(const char *leaf)
{
    return unlinkat(cfg.tree, leaf, AT_REMOVEDIR) == 0 || errno == ENOENT;
}

static void set_window_size(int fd, long long rows, long long cols)
{
    struct winsize size = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    ioctl(fd, TIOCSWINSZ, &size);
}

static void logw_begin(struct logw *log)
{
    log->fd = openat(cfg.log, log->name, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC,
                     0600);
    log->kept = log->size = 0;
}

/* One record [time f64][length u32][bytes] of the stream's last `log_limit` bytes. */
static int logw_write(struct logw *log, const char *data, size_t len)
{
    if (len > cfg.log_limit) {
        data += len - cfg.log_limit;
        len = (size_t)cfg.log_limit;
    }
    unsigned char header[12];
    double when = now_wall();
    uint32_t n = (uint32_t)len;
    memcpy(header, &when, 8); /* little-endian hosts: x86_64 and aarch64 */
    memcpy(header + 8, &n, 4);
    if (log->kept + len > cfg.log_limit || log->size + len + 12 > 2 * cfg.log_limit) {
        char older[32];
        snprintf(older, sizeof(older), "%s.1", log->name);
        if (renameat(cfg.log, log->name, cfg.log, older) < 0)
            return -1;
        close(log->fd);
        logw_begin(log);
    }
    if (log->fd < 0)
        return -1;
    struct buf record = {0};
    buf_add(&record, header, 12);
    buf_add(&record, data, len);
    size_t done = 0;
    while (done < record.len) {
        ssize_t w = write(log->fd, record.data + done, record.len - done);
        if (w < 0) {
            buf_free(&record);
            return -1;
        }
        done += (size_t)w;
    }
    buf_free(&record);
    log->kept += len;
    log->size += len + 12;
    return 0;
}

static void logw_close(struct stream *s)
{
    if (s->log != NULL) {
        if (s->log->fd >= 0)
            close(s->log->fd);
        free(s->log);
        s->log = NULL;
    }
}

static void close_file(struct stream *s)
{
    if (s->file_fd >= 0) {
        close(s->file_fd);
        s->file_fd = -1;
    }
    logw_close(s);
}

/* The exec's output files and the fds its process gets as 0, 1 and 2; -1 with errno. */
static int open_stdio(const struct exec_request *req, int dir_fd, struct exec *e, int stdio[3])
{
    int files[2];
    int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC;
    files[0] = openat(dir_fd, "stdout", flags, 0600);
    if (files[0] < 0)
        return -1;
    files[1] = openat(dir_fd, "stderr", flags, 0600);
    if (files[1] < 0) {
        int saved = errno;
        close(files[0]);
        errno = saved;
        return -1;
    }
    e->out = (struct stream){"stdout", -1, files[0], 0, false, NULL};
    e->err = (struct stream){"stderr", -1, files[1], 0, false, NULL};
    e->stdin_fd = -1;
    if (req->tty) {
        /* A new terminal of the sandbox's devpts, without a path root inside could swap. */
        char path[64];
        int unlock = 0;
        snprintf(path, sizeof(path), "/proc/self/fd/%d", cfg.ptmx);
        int master = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
        int slave = -1;
        if (master >= 0 && ioctl(master, TIOCSPTLCK, &unlock) == 0)
            slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (slave < 0) {
            int saved = errno;
            if (master >= 0)
                close(master);
            close(files[0]);
            close(files[1]);
            errno = saved;
            return -1;
        }
        set_window_size(master, req->rows ? req->rows : 24, req->cols ? req->cols : 80);
        if (cfg.uid_base >= 0) /* its terminal is the user's, group tty inside */
            if (fchown(slave, (uid_t)(cfg.uid_base + req->uid), (gid_t)(cfg.uid_base + 5)) < 0) {
                /* as the Python supervisor: an error here fails the exec */
                int saved = errno;
                close(master);
                close(slave);
                close(files[0]);
                close(files[1]);
                errno = saved;
                return -1;
            }
        close(files[1]); /* a terminal has one output: stderr stays empty */
        e->err.file_fd = -1;
        e->out.fd = master;
        e->stdin_fd = master;
        e->tty = true;
        stdio[0] = stdio[1] = stdio[2] = slave;
        return 0;
    }
    int out[2], err[2], in[2];
    if (pipe2(out, O_CLOEXEC | O_NONBLOCK) < 0)
        goto fail;
    if (pipe2(err, O_CLOEXEC | O_NONBLOCK) < 0) {
        close(out[0]);
        close(out[1]);
        goto fail;
    }
    fcntl(out[1], F_SETFL, 0);
    fcntl(err[1], F_SETFL, 0);
    e->out.fd = out[0];
    e->err.fd = err[0];
    if (strcmp(req->id, MAIN_EXEC) == 0 && cfg.log >= 0) {
        e->out.log = xcalloc(1, sizeof(struct logw));
        e->out.log->name = "stdout";
        logw_begin(e->out.log);
        e->err.log = xcalloc(1, sizeof(struct logw));
        e->err.log->name = "stderr";
        logw_begin(e->err.log);
    }
    stdio[1] = out[1];
    stdio[2] = err[1];
    if (req->interactive || req->stdin_len > 0) {
        if (pipe2(in, O_CLOEXEC) == 0) {
            fcntl(in[1], F_SETFL, O_NONBLOCK);
            e->stdin_fd = in[1];
            stdio[0] = in[0];
            return 0;
        }
    } else {
        /* stdin is empty: an empty memfd reads as end of file at once. */
        stdio[0] = memfd_create("stdin", MFD_CLOEXEC);
        if (stdio[0] >= 0)
            return 0;
    }
    int saved = errno;
    close(out[0]);
    close(out[1]);
    close(err[0]);
    close(err[1]);
    logw_close(&e->out);
    logw_close(&e->err);
    errno = saved;
fail:
    saved = errno;
    close(files[0]);
    close(files[1]);
    errno = saved;
    return -1;
}

static void write_input(struct exec *e);

static bool feed(struct exec *e, const char *data, size_t len, bool eof, char *error, size_t size)
{
    if (e->stdin_fd < 0)
        return true;
    if (e->pending_input.len + len > INPUT_LIMIT) {
        snprintf(error, size, "too much input waiting for a process that does not read it");
        return false;
    }
    buf_add(&e->pending_input, data, len);
    e->close_stdin_after_input |= eof;
    write_input(e);
    return true;
}

static void write_input(struct exec *e)
{
    while (e->pending_input.len > 0) {
        ssize_t n = write(e->stdin_fd, e->pending_input.data, e->pending_input.len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        if (n < 0) { /* the reader is gone: drop what it will never read */
            e->pending_input.len = 0;
            break;
        }
        buf_consume(&e->pending_input, (size_t)n);
    }
    if (e->tty)
        return; /* the master is also the output: it stays polled for reading */
    e->want_write = e->pending_input.len > 0;
    if (!e->want_write && e->close_stdin_after_input) {
        close(e->stdin_fd);
        e->stdin_fd = -1;
    }
}

static void child(const struct exec_request *req, char **envp, int stdio[3], bool joined);

static void send_started_and_exited(const struct exec_request *req, const struct status *s);
static void shut_down(void);

static pid_t fork_into_leaf(const char *leaf, bool *joined)
{
    int fd = openat(cfg.tree, leaf, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    struct clone_args args = {.flags = CLONE_INTO_CGROUP, .exit_signal = SIGCHLD,
                              .cgroup = (unsigned long long)fd};
    long pid = syscall(SYS_clone3, &args, sizeof(args));
    if (pid < 0 && (errno == ENOSYS || errno == E2BIG || errno == EINVAL)) {
        *joined = false; /* a kernel before 5.7: the child joins by itself */
        pid = fork();
    } else {
        *joined = true;
    }
    int saved = errno;
    if (pid != 0)
        close(fd);
    errno = saved;
    return (pid_t)pid;
}

/* The environment: PATH and HOME (set in the child), the sandbox's, then the exec's own. */
static void env_set(char ***envp, size_t *n, const char *key, const char *value)
{
    size_t klen = strlen(key);
    char *entry = xcalloc(klen + strlen(value) + 2, 1);
    sprintf(entry, "%s=%s", key, value);
    for (size_t i = 0; i < *n; i++)
        if (strncmp((*envp)[i], key, klen) == 0 && (*envp)[i][klen] == '=') {
            free((*envp)[i]);
            (*envp)[i] = entry;
            return;
        }
    *envp = xrealloc(*envp, (*n + 2) * sizeof(char *));
    (*envp)[(*n)++] = entry;
    (*envp)[*n] = NULL;
}

static void start(const struct exec_request *req)
{
    char error[512];
    if (!valid_exec_id(req->id, strlen(req->id)) || find_exec(req->id) != NULL) {
        snprintf(error, sizeof(error), "invalid or duplicate exec id '%.80s'", req->id);
        send_error(strcmp(req->id, MAIN_EXEC) == 0 ? NULL : req->id, error);
        return;
    }
    if (mkdirat(execs_fd, req->id, 0700) < 0 || mkdirat(cfg.tree, req->id, 0755) < 0) {
        os_error(error, sizeof(error), errno);
        send_error(req->id, error);
        return;
    }
    int dir_fd = openat(execs_fd, req->id, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    struct exec *e = xcalloc(1, sizeof(*e));
    int stdio[3] = {-1, -1, -1};
    if (dir_fd < 0 || open_stdio(req, dir_fd, e, stdio) < 0) {
        os_error(error, sizeof(error), errno);
        if (dir_fd >= 0)
            close(dir_fd);
        remove_leaf(req->id);
        free(e);
        send_error(req->id, error);
        return;
    }
    close(dir_fd);
    snprintf(e->id, sizeof(e->id), "%s", req->id);
    /* The env, built before the fork: the child only execs it. */
    char **envp = xcalloc(1, sizeof(char *));
    size_t n_env = 0;
    env_set(&envp, &n_env, "PATH", DEFAULT_PATH);
    env_set(&envp, &n_env, "HOME", "/"); /* replaced in the child from /etc/passwd */
    for (size_t i = 0; i < cfg.env->count; i++)
        env_set(&envp, &n_env, cfg.env->keys[i], cfg.env->items[i].string);
    for (size_t i = 0; i < req->env->count; i++)
        env_set(&envp, &n_env, req->env->keys[i], req->env->items[i].string);
    e->oom_kills_before = oom_kills(req->id);
    bool joined = true;
    pid_t pid = fork_into_leaf(req->id, &joined);
    if (pid == 0)
        child(req, envp, stdio, joined); /* never returns */
    int fork_errno = errno;
    for (size_t i = 0; i < n_env; i++)
        free(envp[i]);
    free(envp);
    close(stdio[0]);
    if (stdio[1] != stdio[0])
        close(stdio[1]);
    if (stdio[2] != stdio[0] && stdio[2] != stdio[1])
        close(stdio[2]);
    if (pid < 0) {
        /* No process could be forked: the exec ends at once with 126 and says why on
         * stderr, as a shell does (and as `docker exec` exits 126), and the sandbox goes on. */
        char why[600];
        snprintf(why, sizeof(why), "sandboxd: cannot start %s: fork: %s%s\n", req->cmd[0],
                 strerror(fork_errno),
                 fork_errno == EAGAIN ? " (the sandbox is at its limit of processes, limits.pids)"
                                      : "");
        write_all(e->err.file_fd >= 0 ? e->err.file_fd : e->out.file_fd, why, strlen(why));
        int fds[] = {e->out.fd, e->err.fd, e->stdin_fd};
        for (size_t i = 0; i < 3; i++)
            if (fds[i] >= 0 && (i < 2 || fds[i] != e->out.fd))
                close(fds[i]);
        close_file(&e->out);
        close_file(&e->err);
        struct status s = {.exit_code = EXIT_NOT_EXECUTABLE, .finished_at = now_wall()};
        write_status(req->id, &s);
        remove_leaf(req->id);
        buf_free(&e->pending_input);
        free(e);
        send_started_and_exited(req, &s);
        if (strcmp(req->id, MAIN_EXEC) == 0)
            shut_down();
        return;
    }
    e->pid = pid;
    running = xrealloc(running, (n_running + 1) * sizeof(*running));
    running[n_running++] = e;
    if (req->has_timeout) {
        clock_gettime(CLOCK_MONOTONIC, &e->deadline);
        double at = (double)e->deadline.tv_sec + (double)e->deadline.tv_nsec / 1e9 + req->timeout;
        e->deadline.tv_sec = (time_t)at;
        e->deadline.tv_nsec = (long)((at - (double)(time_t)at) * 1e9);
        e->has_deadline = true;
    }
    if (strcmp(req->id, MAIN_EXEC) == 0) {
        main_pid = pid;
        main_started = true;
    }
    send_started(req->id, pid);
    if (req->stdin_len > 0 && e->stdin_fd >= 0)
        if (!feed(e, req->stdin_data, req->stdin_len, !req->interactive, error, sizeof(error)))
            send_error(req->id, error);
}

static void send_started_and_exited(const struct exec_request *req, const struct status *s)
{
    send_started(req->id, 0);
    send_exited(req->id, s);
}

/* -- the child: becoming the exec's process ------------------------------------------------ */

_Noreturn static void fail_child(int code, const char *format, const char *a, const char *b)
{
    char text[1024];
    int n = snprintf(text, sizeof(text), format, a, b);
    if (n > 0)
        write_all(2, text, (size_t)n < sizeof(text) ? (size_t)n : sizeof(text) - 1);
    _exit(code);
}

_Noreturn static void fail_step(const struct exec_request *req, const char *what)
{
    char reason[300];
    snprintf(reason, sizeof(reason), "%s: [Errno %d] %s", what, errno, strerror(errno));
    fail_child(EXIT_NOT_EXECUTABLE, "sandboxd: cannot start %s: %s\n", req->cmd[0], reason);
}

/* The uid's primary gid and home from the sandbox's /etc/passwd; else (uid, "/"). */
static void passwd_entry(long long uid, long long *gid, char *home, size_t size)
{
    *gid = uid;
    snprintf(home, size, "%s", uid == 0 ? "/root" : "/");
    /* Non-blocking and regular files only: root inside could have made it a FIFO. */
    int fd = open("/etc/passwd", O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    if (fd < 0)
        return;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return;
    }
    size_t cap = st.st_size > 0 && st.st_size < PASSWD_LIMIT ? (size_t)st.st_size + 1 : 65536;
    char *data = xcalloc(cap + 1, 1);
    size_t len = 0;
    while (len < cap && len < PASSWD_LIMIT) {
        ssize_t n = read(fd, data + len, cap - len);
        if (n <= 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    data[len] = '\0';
    char want[32];
    snprintf(want, sizeof(want), "%lld", uid);
    for (char *line = data; line != NULL && *line;) {
        char *next = strchr(line, '\n');
        if (next != NULL)
            *next++ = '\0';
        char *fields[7] = {0};
        size_t count = 0;
        for (char *at = line; count < 7;) {
            fields[count++] = at;
            char *colon = strchr(at, ':');
            if (colon == NULL)
                break;
            *colon = '\0';
            at = colon + 1;
        }
        if (count >= 7 && strcmp(fields[2], want) == 0 && fields[3][0] != '\0' &&
            strspn(fields[3], "0123456789") == strlen(fields[3]) && strlen(fields[3]) < 11) {
            *gid = atoll(fields[3]);
            snprintf(home, size, "%s", fields[5][0] ? fields[5] : "/");
            break;
        }
        line = next;
    }
    free(data);
}

/* Child, in the sandbox, host root: set up the process and exec it. Never returns. */
static void child(const struct exec_request *req, char **envp, int stdio[3], bool joined)
{
    /* 0. Into the exec's own cgroups first (born in it by clone3, unless the kernel could
     *    not), so its deadline reaches all it starts; back to an OOM score of 0 as host root. */
    char path[128];
    snprintf(path, sizeof(path), "%s/cgroup.procs", req->id);
    if (!joined && write_file_at(cfg.tree, path, "0") < 0)
        fail_step(req, "cgroup");
    if (write_file_at(AT_FDCWD, "/proc/self/oom_score_adj", "0") < 0)
        fail_step(req, "oom_score_adj");
    /* 1. Clean signal dispositions and mask: ignored ones would survive execve. */
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* 2. A session of its own, its own process group; a terminal if it asked for one. */
    setsid();
    for (int target = 0; target < 3; target++)
        if (dup2(stdio[target], target) < 0)
            fail_step(req, "dup2");
    if (req->tty && ioctl(0, TIOCSCTTY, 0) < 0)
        fail_step(req, "TIOCSCTTY");
    /* 3. Into the sandbox's user namespace, first as root inside, to read its passwd. */
    if (cfg.userns >= 0) {
        if (setns(cfg.userns, CLONE_NEWUSER) < 0 || setgroups(0, NULL) < 0 ||
            setresgid(0, 0, 0) < 0 || setresuid(0, 0, 0) < 0)
            fail_step(req, "user namespace");
    }
    /* Docker's default capabilities only; now, while root: another uid could not drop them.
     * The bounding set one prctl a capability (no call takes a set), the rest in one capset. */
    for (int cap = 0; cap <= cfg.cap_last; cap++)
        if (!(cfg.keep_caps & (1ULL << cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
            fail_step(req, "capabilities");
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        fail_step(req, "capabilities");
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {
        {(uint32_t)cfg.keep_caps, (uint32_t)cfg.keep_caps, 0},
        {(uint32_t)(cfg.keep_caps >> 32), (uint32_t)(cfg.keep_caps >> 32), 0}};
    if (syscall(SYS_capset, &header, data) < 0)
        fail_step(req, "capabilities");
    long long gid;
    char home[4096];
    passwd_entry(req->uid, &gid, home, sizeof(home));
    if (req->gid >= 0)
        gid = req->gid;
    /* Ids the user namespace maps only: a gid of 4294967295 in /etc/passwd is (gid_t)-1,
     * "no change" to setresgid, which would leave the exec in group 0. */
    long long max_id = cfg.userns >= 0 ? cfg.id_range - 1 : 0xFFFFFFFELL;
    if (req->uid > max_id || gid < 0 || gid > max_id) {
        char reason[160];
        snprintf(reason, sizeof(reason), "credentials: uid %lld or gid %lld is out of 0..%lld",
                 req->uid, gid, max_id);
        fail_child(EXIT_NOT_EXECUTABLE, "sandboxd: cannot start %s: %s\n", req->cmd[0], reason);
    }
    if (setgroups(0, NULL) < 0 || setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) < 0 ||
        setresuid((uid_t)req->uid, (uid_t)req->uid, (uid_t)req->uid) < 0)
        fail_step(req, "credentials");
    /* HOME from /etc/passwd unless the exec's env says otherwise. */
    bool own_home = false;
    for (const struct json *envs[2] = {cfg.env, req->env}, **p = envs; p < envs + 2; p++)
        own_home |= json_get(*p, "HOME") != NULL;
    if (!own_home)
        for (char **entry = envp; *entry != NULL; entry++)
            if (strncmp(*entry, "HOME=", 5) == 0) {
                *entry = xcalloc(strlen(home) + 6, 1);
                sprintf(*entry, "HOME=%s", home);
            }
    /* 4. Nothing of the supervisor's may reach the process: only 0, 1 and 2 stay open. */
    if (syscall(SYS_close_range, 3U, ~0U, 0U) < 0)
        fail_step(req, "close_range");
    if (chdir(req->cwd) < 0)
        fail_child(EXIT_NOT_EXECUTABLE, "sandboxd: cannot change to directory %s: %s\n",
                   req->cwd, strerror(errno));
    /* 5. Last: no_new_privs and the seccomp filter (compiled once, by the zygote). */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &cfg.filter, 0, 0) < 0)
        fail_step(req, "seccomp");
    /* The path resolved once along PATH: 127 if nowhere, 126 if found but not runnable. */
    const char *name = req->cmd[0];
    const char *search = DEFAULT_PATH;
    for (char **entry = envp; *entry != NULL; entry++)
        if (strncmp(*entry, "PATH=", 5) == 0)
            search = *entry + 5;
    int denied = 0;
    if (strchr(name, '/') != NULL) {
        execve(name, req->cmd, envp);
        if (errno != ENOENT && errno != ENOTDIR && errno != ENAMETOOLONG)
            denied = errno;
    } else {
        size_t name_len = strlen(name);
        for (const char *dir = search;; dir++) {
            const char *colon = strchrnul(dir, ':');
            size_t dir_len = (size_t)(colon - dir);
            char candidate[4096];
            if (dir_len + name_len + 2 <= sizeof(candidate)) {
                memcpy(candidate, dir_len ? dir : ".", dir_len ? dir_len : 1);
                size_t at = dir_len ? dir_len : 1;
                candidate[at++] = '/';
                memcpy(candidate + at, name, name_len + 1);
                struct stat st;
                if (stat(candidate, &st) == 0) {
                    execve(candidate, req->cmd, envp);
                    if (errno != ENOENT && errno != ENOTDIR && errno != ENAMETOOLONG && !denied)
                        denied = errno;
                } else if (errno != ENOENT && errno != ENOTDIR && errno != ENAMETOOLONG &&
                           !denied) {
                    denied = errno;
                }
            }
            if (*colon == '\0')
                break;
            dir = colon;
        }
    }
    if (denied)
        fail_child(EXIT_NOT_EXECUTABLE, "sandboxd: %s: %s\n", name, strerror(denied));
    fail_child(EXIT_NOT_FOUND, "sandboxd: %s: command not found\n", name, "");
}

/* -- input and output ---------------------------------------------------------------------- */

static void deliver(struct exec *e, struct stream *s, const char *data, size_t len)
{
    if (s->file_fd < 0)
        return; /* the exec has ended: later output of its children is not part of it */
    unsigned long long room = cfg.output_limit - (s->total < cfg.output_limit ? s->total
                                                                             : cfg.output_limit);
    if (len > room)
        s->truncated = true;
    if (room > 0)
        write_all(s->file_fd, data, len < room ? len : (size_t)room);
    if (s->log != NULL && logw_write(s->log, data, len) < 0)
        logw_close(s); /* the state directory's disk is full: the command goes on unlogged */
    if (e->subscribed) {
        struct buf m = {0};
        begin(&m, "output");
        field_string(&m, "id", e->id);
        field_string(&m, "stream", s->name);
        buf_printf(&m, ",\"offset\":%llu,\"data\":\"", s->total);
        base64_encode(&m, (const unsigned char *)data, len);
        buf_str(&m, "\"");
        send_message(&m, true);
    }
    s->total += len;
}

/* Read what is there; at its end, close it (and a pty master's input with it). */
static void on_output(struct exec *e, struct stream *s)
{
    static char chunk[READ_CHUNK];
    for (;;) {
        ssize_t n = read(s->fd, chunk, sizeof(chunk));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0) { /* a pty's master reads EIO once no slave is left */
            if (e->stdin_fd == s->fd)
                e->stdin_fd = -1;
            close(s->fd);
            s->fd = -1;
            return;
        }
        deliver(e, s, chunk, (size_t)n);
    }
}

static void on_draining(size_t index)
{
    static char chunk[READ_CHUNK];
    ssize_t n;
    while ((n = read(draining[index], chunk, sizeof(chunk))) > 0)
        ;
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    close(draining[index]);
    draining[index] = draining[--n_draining];
}

/* -- endings ------------------------------------------------------------------------------- */

static void linger(const char *leaf)
{
    if (remove_leaf(leaf))
        return;
    lingering = xrealloc(lingering, (n_lingering + 1) * sizeof(char *));
    lingering[n_lingering++] = xstrdup(leaf);
}

static void retry_lingering(void)
{
    for (size_t i = 0; i < n_lingering;) {
        if (remove_leaf(lingering[i])) {
            free(lingering[i]);
            lingering[i] = lingering[--n_lingering];
        } else {
            i++;
        }
    }
}

/* Store how an exec ended: drain its output, write status.json, tell the daemon. */
static void finish(size_t index)
{
    struct exec *e = running[index];
    for (size_t i = index + 1; i < n_running; i++)
        running[i - 1] = running[i];
    n_running--;
    struct stream *streams[2] = {&e->out, &e->err};
    for (size_t i = 0; i < 2; i++) {
        struct stream *s = streams[i];
        if (s->fd >= 0)
            on_output(e, s);
        close_file(s);
        if (s->fd >= 0) { /* its children hold it still: read on, keep nothing */
            draining = xrealloc(draining, (n_draining + 1) * sizeof(int));
            draining[n_draining++] = s->fd;
        }
    }
    if (e->stdin_fd >= 0 && !e->tty)
        close(e->stdin_fd);
    struct status s = {.exit_code = -1, .timed_out = e->timed_out,
                       .stdout_truncated = e->out.truncated, .stderr_truncated = e->err.truncated,
                       .finished_at = now_wall()};
    char scratch[16];
    if (WIFSIGNALED(e->wait_status))
        s.signal = signal_name(WTERMSIG(e->wait_status), scratch, sizeof(scratch));
    else
        s.exit_code = WEXITSTATUS(e->wait_status);
    /* The OOM killer's victim dies of SIGKILL, its memory cgroup having counted the kill
     * first. Killed so, while the count rose, and not by its deadline: the OOM killer's. */
    long long counted = oom_kills(e->id) - e->oom_kills_before;
    counted = counted > 0 ? counted : 0;
    s.oom_killed = WIFSIGNALED(e->wait_status) && WTERMSIG(e->wait_status) == SIGKILL &&
                   !e->timed_out && counted > 0;
    /* Every kill the count saw is told once: with the exec it ran under, or with the main cmd
     * (which, on a sandbox-wide count, leaves out those told with execs). */
    s.oom_kills = counted;
    if (!(main_started && e->pid == main_pid)) {
        oom_kills_reported += counted;
    } else if (!cfg.memory_per_exec) {
        long long rest = counted - oom_kills_reported;
        s.oom_kills = rest > (s.oom_killed ? 1 : 0) ? rest : (s.oom_killed ? 1 : 0);
    }
    if (write_status(e->id, &s) < 0) {
        char error[300];
        os_error(error, sizeof(error), errno);
        send_error(NULL, error);
    }
    send_exited(e->id, &s);
    linger(e->id);
    bool was_main = main_started && e->pid == main_pid;
    buf_free(&e->pending_input);
    free(e);
    if (was_main)
        shut_down();
}

/* The main cmd ended: kill every process of the sandbox, record them, and exit. */
static void shut_down(void)
{
    kill(-1, SIGKILL);
    for (;;) {
        bool waiting = false;
        for (size_t i = 0; i < n_running; i++)
            waiting |= !running[i]->reaped;
        if (!waiting)
            break;
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid < 0)
            break;
        for (size_t i = 0; i < n_running; i++)
            if (!running[i]->reaped && running[i]->pid == pid) {
                running[i]->reaped = true;
                running[i]->wait_status = status;
            }
    }
    main_started = false; /* no second shut_down from the finishes below */
    while (n_running > 0 && running[0]->reaped)
        finish(0);
    for (size_t i = 0; i < n_running;)
        if (running[i]->reaped)
            finish(i);
        else
            i++;
    flush();
    _exit(0);
}

static void finish_drained(void)
{
    for (size_t i = 0; i < n_running;) {
        struct exec *e = running[i];
        /* A killed exec ends when its whole tree is gone, so none of it outlives the answer. */
        if (e->reaped && (!e->timed_out || !populated(e->id)))
            finish(i);
        else
            i++;
    }
}

static void reap(void)
{
    struct signalfd_siginfo info;
    while (read(sigchld_fd, &info, sizeof(info)) > 0)
        ;
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0)
            break;
        for (size_t i = 0; i < n_running; i++) /* an orphan needs nothing but the reaping */
            if (!running[i]->reaped && running[i]->pid == pid) {
                running[i]->reaped = true;
                running[i]->wait_status = status;
                break;
            }
    }
    finish_drained();
    retry_lingering();
}

static int timespec_cmp(const struct timespec *a, const struct timespec *b)
{
    if (a->tv_sec != b->tv_sec)
        return a->tv_sec < b->tv_sec ? -1 : 1;
    return a->tv_nsec < b->tv_nsec ? -1 : a->tv_nsec > b->tv_nsec;
}

static void expire_deadlines(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    for (size_t i = 0; i < n_running; i++) {
        struct exec *e = running[i];
        if (e->has_deadline && !e->timed_out && timespec_cmp(&e->deadline, &now) <= 0) {
            e->timed_out = true;
            /* The exec's whole cgroup: setsid'd, double-forked and orphaned ones too. */
            char path[128];
            snprintf(path, sizeof(path), "%s/cgroup.kill", e->id);
            if (write_file_at(cfg.tree, path, "1") < 0) {
                char error[300];
                os_error(error, sizeof(error), errno);
                send_error(NULL, error);
            }
        }
    }
}

static int next_timeout(void)
{
    struct timespec now, first = {0, 0};
    bool any = false;
    for (size_t i = 0; i < n_running; i++) {
        if (running[i]->reaped)
            return DRAIN_POLL_MS;
        if (running[i]->has_deadline && !running[i]->timed_out &&
            (!any || timespec_cmp(&running[i]->deadline, &first) < 0)) {
            first = running[i]->deadline;
            any = true;
        }
    }
    if (!any)
        return -1;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long ms = (long long)(first.tv_sec - now.tv_sec) * 1000 +
                   (first.tv_nsec - now.tv_nsec) / 1000000 + 1;
    return ms < 0 ? 0 : ms > 60000 ? 60000 : (int)ms;
}

/* -- handling one request ------------------------------------------------------------------ */

static char *message_id(const char *line, size_t len)
{
    const char *why;
    struct json *tree = json_parse(line, len, &why);
    const struct json *id = json_get(tree, "id");
    char *copy = id != NULL && id->kind == JSON_STRING ? xstrdup(id->string) : NULL;
    json_free(tree);
    return copy;
}

static void handle(const char *line, size_t len)
{
    struct request r;
    char error[512];
    if (!decode(line, len, &r, error, sizeof(error))) {
        char *id = message_id(line, len);
        send_error(id, error);
        free(id);
        request_free(&r);
        return;
    }
    if (strcmp(r.type, "exec") == 0) {
        start(&r.exec);
    } else if (strcmp(r.type, "configure") == 0) {
        /* Host root in the UTS namespace's owner: root inside cannot, we can. */
        if (sethostname(r.hostname, strlen(r.hostname)) < 0) {
            os_error(error, sizeof(error), errno);
            send_error(NULL, error);
        }
        json_free(cfg.env);
        /* The new env taken out of the request's tree, which is freed below. */
        cfg.env = xcalloc(1, sizeof(struct json));
        *cfg.env = *r.env;
        memset((struct json *)r.env, 0, sizeof(struct json));
    } else {
        struct exec *e = find_exec(r.id);
        if (e == NULL) {
            /* it ended meanwhile: the daemon learns that from EXITED */
        } else if (strcmp(r.type, "signal") == 0) {
            if (kill(e->pid, (int)r.number) < 0 && errno != ESRCH) {
                os_error(error, sizeof(error), errno);
                send_error(r.id, error);
            }
        } else if (strcmp(r.type, "subscribe") == 0) {
            e->subscribed = true;
            struct buf m = {0};
            begin(&m, "subscribed");
            field_string(&m, "id", e->id);
            buf_printf(&m, ",\"offsets\":{\"stdout\":%llu,\"stderr\":%llu}", e->out.total,
                       e->err.total);
            send_message(&m, false);
        } else if (strcmp(r.type, "unsubscribe") == 0) {
            e->subscribed = false;
        } else if (strcmp(r.type, "input") == 0) {
            if (!feed(e, r.data.data, r.data.len, r.eof, error, sizeof(error)))
                send_error(r.id, error);
        } else if (e->tty && e->stdin_fd >= 0) { /* a resize */
            set_window_size(e->stdin_fd, r.rows, r.cols);
        }
    }
    request_free(&r);
}

static void on_conn_readable(void)
{
    static char chunk[READ_CHUNK];
    ssize_t n = recv(conn, chunk, sizeof(chunk), MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0 || inbox.len > INBOX_LIMIT) {
        drop_connection();
        return;
    }
    buf_add(&inbox, chunk, (size_t)n);
    size_t at = 0;
    for (;;) {
        char *newline = memchr(inbox.data + at, '\n', inbox.len - at);
        if (newline == NULL)
            break;
        size_t end = (size_t)(newline - inbox.data);
        handle(inbox.data + at, end - at);
        at = end + 1;
        if (conn < 0)
            return; /* dropped while handling: its inbox went with it */
    }
    buf_consume(&inbox, at);
}

/* -- the loop ------------------------------------------------------------------------------ */

enum { TAG_LISTENER, TAG_SIGNAL, TAG_CONN, TAG_OUT, TAG_ERR, TAG_STDIN, TAG_DRAIN };

static void run(void)
{
    struct pollfd *fds = NULL;
    struct { int tag; size_t index; } *what = NULL;
    size_t cap = 0;
    for (;;) {
        size_t n = 0, need = 3 + 3 * n_running + n_draining;
        if (need > cap) {
            cap = need * 2;
            fds = xrealloc(fds, cap * sizeof(*fds));
            what = xrealloc(what, cap * sizeof(*what));
        }
#define WATCH(f, ev, t, i) (fds[n] = (struct pollfd){(f), (ev), 0}, what[n].tag = (t), what[n++].index = (i))
        WATCH(cfg.listener, POLLIN, TAG_LISTENER, 0);
        WATCH(sigchld_fd, POLLIN, TAG_SIGNAL, 0);
        if (conn >= 0)
            WATCH(conn, POLLIN | (outbox.len ? POLLOUT : 0), TAG_CONN, 0);
        for (size_t i = 0; i < n_running; i++) {
            struct exec *e = running[i];
            if (e->out.fd >= 0)
                WATCH(e->out.fd, POLLIN, TAG_OUT, i);
            if (e->err.fd >= 0)
                WATCH(e->err.fd, POLLIN, TAG_ERR, i);
            if (e->stdin_fd >= 0 && e->want_write && !e->tty)
                WATCH(e->stdin_fd, POLLOUT, TAG_STDIN, i);
        }
        for (size_t i = 0; i < n_draining; i++)
            WATCH(draining[i], POLLIN, TAG_DRAIN, i);
#undef WATCH
        int ready = poll(fds, n, next_timeout());
        if (ready < 0 && errno != EINTR)
            abort();
        /* Handlers change the tables: act on what the round saw, by identity, not index. */
        for (size_t k = 0; ready > 0 && k < n; k++) {
            if (!fds[k].revents)
                continue;
            switch (what[k].tag) {
            case TAG_LISTENER:
                on_accept();
                break;
            case TAG_SIGNAL:
                reap();
                break;
            case TAG_CONN:
                if (conn != fds[k].fd)
                    break;
                if (fds[k].revents & POLLOUT)
                    flush();
                if (conn >= 0 && fds[k].revents & (POLLIN | POLLHUP | POLLERR))
                    on_conn_readable();
                break;
            case TAG_OUT:
            case TAG_ERR:
            case TAG_STDIN:
                for (size_t i = 0; i < n_running; i++) {
                    struct exec *e = running[i];
                    if (what[k].tag == TAG_OUT && e->out.fd == fds[k].fd)
                        on_output(e, &e->out);
                    else if (what[k].tag == TAG_ERR && e->err.fd == fds[k].fd)
                        on_output(e, &e->err);
                    else if (what[k].tag == TAG_STDIN && e->stdin_fd == fds[k].fd)
                        write_input(e);
                    else
                        continue;
                    break;
                }
                break;
            case TAG_DRAIN:
                for (size_t i = 0; i < n_draining; i++)
                    if (draining[i] == fds[k].fd) {
                        on_draining(i);
                        break;
                    }
                break;
            }
        }
        expire_deadlines();
        finish_drained();
    }
}

/* -- setup --------------------------------------------------------------------------------- */

static int config_fd(const struct json *root, const char *key, bool *ok)
{
    long long v = get_int(root, key, -1, ok);
    if (v < -1 || v > 65535)
        *ok = false;
    return (int)v;
}

/* The config the zygote wrote to fd `fd` (a memfd): fds, limits, the main cmd, the filter. */
static const char *read_config(int fd)
{
    static struct json *root;
    struct buf text = {0};
    char chunk[4096];
    ssize_t n;
    while ((n = pread(fd, chunk, sizeof(chunk), (off_t)text.len)) > 0)
        buf_add(&text, chunk, (size_t)n);
    close(fd);
    const char *why = NULL;
    root = json_parse(text.data ? text.data : "", text.len, &why);
    buf_free(&text);
    if (root == NULL)
        return "the config is not JSON";
    bool ok = root->kind == JSON_OBJECT;
    cfg.listener = config_fd(root, "listener", &ok);
    cfg.run = config_fd(root, "run", &ok);
    cfg.tree = config_fd(root, "tree", &ok);
    cfg.memory = config_fd(root, "memory", &ok);
    cfg.userns = config_fd(root, "userns", &ok);
    cfg.ptmx = config_fd(root, "ptmx", &ok);
    cfg.log = config_fd(root, "log", &ok);
    cfg.seccomp = config_fd(root, "seccomp", &ok);
    cfg.memory_per_exec = get_bool(root, "memory_per_exec", &ok);
    cfg.uid_base = get_int(root, "uid_base", -1, &ok);
    cfg.id_range = get_int(root, "id_range", 65536, &ok);
    cfg.output_limit = (unsigned long long)get_int(root, "output_limit", 0, &ok);
    cfg.log_limit = (unsigned long long)get_int(root, "log_limit", 0, &ok);
    cfg.keep_caps = (unsigned long long)get_int(root, "keep_caps", 0, &ok);
    cfg.cap_last = (int)get_int(root, "cap_last", 40, &ok);
    const struct json *cmd = json_get(root, "cmd");
    if (cmd != NULL && cmd->kind != JSON_NULL && (cfg.cmd = string_list(cmd)) == NULL)
        ok = false;
    const struct json *env = json_get(root, "env");
    if (!ok || !string_map(env) || cfg.listener < 0 || cfg.run < 0 || cfg.tree < 0 ||
        cfg.seccomp < 0 || cfg.cap_last < 0 || cfg.cap_last > 63)
        return "the config lacks a field or has one of the wrong type";
    cfg.env = xcalloc(1, sizeof(struct json));
    *cfg.env = *env; /* taken out of the tree, which lives on (cmd points into it) */
    memset((struct json *)env, 0, sizeof(struct json));
    /* The seccomp filter: struct sock_filter[] exactly as libseccomp exported it. */
    struct stat st;
    if (fstat(cfg.seccomp, &st) < 0 || st.st_size <= 0 || st.st_size % 8 != 0 ||
        st.st_size > 8 * 65535)
        return "the seccomp program is not a BPF program";
    struct sock_filter *program = xcalloc((size_t)st.st_size / 8, sizeof(*program));
    if (pread(cfg.seccomp, program, (size_t)st.st_size, 0) != st.st_size)
        return "cannot read the seccomp program";
    close(cfg.seccomp);
    cfg.filter.len = (unsigned short)(st.st_size / 8);
    cfg.filter.filter = program;
    return NULL;
}

/* Setup failed: tell the daemon in place of HELLO, on its connection, then exit. */
_Noreturn static void report_setup_error(const char *message, int number)
{
    struct pollfd p = {cfg.listener, POLLIN, 0};
    if (cfg.listener >= 0 && poll(&p, 1, SETUP_REPORT_WAIT_MS) == 1) {
        int fd = accept4(cfg.listener, NULL, NULL, SOCK_CLOEXEC);
        if (fd >= 0) {
            struct buf m = {0};
            begin(&m, "setup_error");
            field_string(&m, "step", "supervisor");
            if (number)
                buf_printf(&m, ",\"errno\":%d", number);
            else
                buf_str(&m, ",\"errno\":null");
            char text[512];
            snprintf(text, sizeof(text), "%s: %s", number ? "OSError" : "ValueError", message);
            field_string(&m, "message", text);
            buf_str(&m, ",\"invalid\":false}\n");
            write_all(fd, m.data, m.len);
            close(fd);
        }
    }
    _exit(1);
}

/* Tests: each line of stdin decoded as a request, and how: "ok TYPE" or "error TEXT". */
static int parse_only(void)
{
    char chunk[4096];
    ssize_t n;
    struct buf all = {0};
    while ((n = read(0, chunk, sizeof(chunk))) > 0)
        buf_add(&all, chunk, (size_t)n);
    size_t at = 0;
    while (at < all.len) {
        char *newline = memchr(all.data + at, '\n', all.len - at);
        size_t end = newline ? (size_t)(newline - all.data) : all.len;
        struct request r;
        char error[512];
        struct buf out = {0};
        /* Each line in a buffer of its own size, so ASan sees a read past its end. */
        char *line_copy = xcalloc(end - at ? end - at : 1, 1);
        memcpy(line_copy, all.data + at, end - at);
        if (decode(line_copy, end - at, &r, error, sizeof(error))) {
            buf_printf(&out, "ok %s", r.type);
            if (strcmp(r.type, "input") == 0) {
                buf_str(&out, " ");
                base64_encode(&out, (const unsigned char *)r.data.data, r.data.len);
            }
        } else {
            char *id = message_id(all.data + at, end - at);
            buf_str(&out, "error ");
            buf_json_string(&out, error, strlen(error));
            if (id != NULL)
                buf_printf(&out, " id=%zu", strlen(id));
            free(id);
        }
        buf_str(&out, "\n");
        write_all(1, out.data, out.len);
        buf_free(&out);
        request_free(&r);
        free(line_copy);
        at = end + 1;
    }
    buf_free(&all);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--parse-only") == 0)
        return parse_only();
    if (argc != 2 || strspn(argv[1], "0123456789") != strlen(argv[1])) {
        fprintf(stderr, "usage: sandboxd-init CONFIG_FD | --parse-only\n");
        return 2;
    }
    cfg.listener = -1;
    /* execve made us dumpable again: no process inside may ptrace us or open /proc/1. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    prctl(PR_SET_NAME, "sandboxd-sup", 0, 0, 0); /* the name `ps` shows, as the Python one's */
    const char *error = read_config(atoi(argv[1]));
    if (error != NULL)
        report_setup_error(error, 0);
    /* SIGCHLD through a signalfd; SIGINT and SIGPIPE ignored. As PID 1 of its namespace it
     * gets from inside only the signals it handles: nothing inside can end it. */
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    signal(SIGINT, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    sigchld_fd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
    execs_fd = openat(cfg.run, "execs", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (sigchld_fd < 0 || execs_fd < 0)
        report_setup_error("cannot open the mailbox", errno);
    /* Everything the zygote handed over stays ours alone. */
    int fds[] = {cfg.listener, cfg.run, cfg.tree, cfg.memory, cfg.userns, cfg.ptmx, cfg.log};
    for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
        if (fds[i] >= 0)
            fcntl(fds[i], F_SETFD, FD_CLOEXEC);
    fcntl(cfg.listener, F_SETFL, O_NONBLOCK);
    run();
}
