#ifndef SL_CORE_STATUS_H
#define SL_CORE_STATUS_H

/* Result of a step function (parser, filter, connection handler). */
enum sl_status {
    SL_OK = 0, /* progress made; call again or continue */
    SL_AGAIN,  /* need more input, or will be called back */
    SL_DONE,   /* finished */
    SL_ERROR,  /* failed; the reason is reported separately */
};

#endif
