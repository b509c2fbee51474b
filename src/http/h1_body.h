#ifndef SL_HTTP_H1_BODY_H
#define SL_HTTP_H1_BODY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "core/buf.h"
#include "core/slice.h"
#include "core/status.h"
#include "core/transport.h"
#include "http/h1_parse.h"

/*
 * Streaming message bodies without copies. The reader strips framing in place from the
 * connection's read buffer and hands out data slices at the buffer's head; the writer frames
 * data (Content-Length, chunked, or until-close) and writes it with one writev straight from
 * the other connection's read buffer. Bytes leave the source buffer only once written, so a
 * slow receiver stops the sender's reads: that is the backpressure, and memory stays flat.
 */

struct sl_h1_body_reader {
    enum sl_h1_body kind;
    uint64_t remaining; /* LENGTH: bytes left */
    uint64_t pending;   /* data bytes at the buffer head already de-framed */
    uint64_t total;     /* data bytes handed out so far */
    bool done;
    struct sl_h1_chunked ch;
};

void sl_h1_body_reader_init(struct sl_h1_body_reader *r, enum sl_h1_body kind, uint64_t length);

/*
 * Looks at the body bytes in `in`: strips framing (consuming it from `in`) and returns in
 * *data the data bytes now at the head of `in`. Returns SL_OK (data.len > 0), SL_AGAIN (no data
 * now: read more), SL_DONE (body complete; framing consumed) or SL_ERROR (*err set).
 * `eof` says the peer closed: for UNTIL_CLOSE that ends the body, otherwise it is an error
 * (SL_H1_ERR_BAD_CHUNK for a truncated chunked body; the caller knows which side it read).
 */
enum sl_status sl_h1_body_reader_peek(struct sl_h1_body_reader *r, struct sl_buf *in, bool eof,
                                      struct sl_slice *data, enum sl_h1_err *err);

/* Marks `n` data bytes (from the last peek) as used and consumes them from `in`. */
void sl_h1_body_reader_consume(struct sl_h1_body_reader *r, struct sl_buf *in, size_t n);

enum sl_h1_wmode { SL_H1_W_NONE = 0, SL_H1_W_LENGTH, SL_H1_W_CHUNKED, SL_H1_W_CLOSE };

struct sl_h1_body_writer {
    enum sl_h1_wmode mode;
    char frame[24]; /* pending framing bytes: a chunk-size line, a CRLF, or the last chunk */
    uint8_t frame_len, frame_off;
    bool crlf_after;     /* the current chunk's data is followed by a CRLF not yet queued */
    bool finished;       /* the final framing was queued */
    uint64_t chunk_left; /* data bytes of the current chunk not yet written */
    uint64_t written;    /* data bytes written in total */
};

void sl_h1_body_writer_init(struct sl_h1_body_writer *w, enum sl_h1_wmode mode);

/*
 * Writes, in one writev: the pending bytes of `head` (a serialized message head, consumed as
 * written), pending framing, then up to `len` bytes of `data` framed per the mode; `fin` asks
 * for the final framing (the last chunk) once all data is out. *data_written tells how many
 * data bytes went out (the caller consumes that much from its source). Returns 0, -EAGAIN when
 * the socket is full (wait for EPOLLOUT), or -errno. *flushed is true when nothing of head,
 * framing or (with fin) the final chunk remains pending.
 */
int sl_h1_body_writer_write(struct sl_h1_body_writer *w, struct sl_transport *tr,
                            struct sl_buf *head, const char *data, size_t len, bool fin,
                            size_t *data_written, bool *flushed);

#endif
