/* The pod sandbox's process: holds the pod's namespaces open and exits on SIGINT/SIGTERM. */
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

static void stop(int signo) {
  (void)signo;
  _exit(0);
}

int main(void) {
  struct sigaction action = {0};
  action.sa_handler = stop;
  sigaction(SIGINT, &action, NULL);
  sigaction(SIGTERM, &action, NULL);
  for (;;) {
    pause();
  }
}
