/* LD_PRELOAD for wrk: every new connection makes a full TLS handshake.
 *
 * wrk reuses one SSL object per connection slot and, on reconnecting,
 * SSL_clear()s it, which keeps the last session: the next handshake resumes
 * it (TLS 1.3 PSK: no certificate sent, no signature made).  A cell meant to
 * measure handshakes per second would then measure resumptions, and how
 * each server issues tickets.  Dropping the session before SSL_clear makes
 * every handshake a full one, as from new clients.  bench/loads.py compiles
 * this (gcc) into bench/results/tmp/ and uses it for the TLS `Connection:
 * close` loads only.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

typedef struct ssl_st SSL;

int SSL_clear(SSL *ssl)
{
    static int (*real_clear)(SSL *);
    static int (*set_session)(SSL *, void *);

    if (!real_clear) {  /* libssl is wrk's own: look both up there */
        real_clear = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_clear");
        set_session = (int (*)(SSL *, void *))dlsym(RTLD_NEXT, "SSL_set_session");
    }
    set_session(ssl, NULL);
    return real_clear(ssl);
}
