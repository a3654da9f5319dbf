"""The account pages, at this site's addresses: allauth's views (with this
site's rules: accounts/views.py, accounts/adapter.py) under allauth's URL
names, which its own code reverses, and this site's older names beside them
(`login`, `signup`, `password_reset`). Not mounted: allauth's e-mail
management and login by code."""

from allauth.account import views as allauth_views
from allauth.socialaccount import views as social_views
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path
from django.views.generic import RedirectView

from . import views

login = views.LoginView.as_view()
signup = views.SignupView.as_view()
password_reset = views.PasswordResetView.as_view()
logout = auth_views.LogoutView.as_view()  # POST only

urlpatterns = [
    path("login/", login, name="login"),
    path("login/", login, name="account_login"),
    path("logout/", logout, name="logout"),
    path("logout/", logout, name="account_logout"),
    path("inactive/", allauth_views.account_inactive, name="account_inactive"),
    path("signup/", signup, name="signup"),
    path("signup/", signup, name="account_signup"),
    path("reauthenticate/", allauth_views.reauthenticate, name="account_reauthenticate"),
    path("password/change/", allauth_views.password_change, name="account_change_password"),
    path("password/set/", views.PasswordSetView.as_view(), name="account_set_password"),
    # allauth sends people to "the e-mail page" in a few places: here, the password.
    path("email/", RedirectView.as_view(pattern_name="account_change_password"), name="account_email"),
    # Password reset: a mailed link that works once.
    path("password-reset/", password_reset, name="password_reset"),
    path("password-reset/", password_reset, name="account_reset_password"),
    path("password-reset/sent/", allauth_views.password_reset_done, name="account_reset_password_done"),
    re_path(
        r"^password-reset/key/(?P<uidb36>[0-9A-Za-z]+)-(?P<key>.+)/$",
        views.PasswordResetFromKeyView.as_view(),
        name="account_reset_password_from_key",
    ),
    path(
        "password-reset/done/",
        allauth_views.password_reset_from_key_done,
        name="account_reset_password_from_key_done",
    ),
    # A link in the older form (Django's reset, before allauth): dead, and said so.
    path("password-reset/<uidb64>/<token>/", views.old_password_reset_link),
    # Invitations by staff.
    path("invite/", views.invite, name="invite"),
    path("invitation/<uidb64>/<token>/", views.InvitationAcceptView.as_view(), name="invitation_accept"),
    # Two-factor authentication: an authenticator app and recovery codes; the
    # code step under the login throttle (before allauth's own at that address).
    path("2fa/authenticate/", views.TwoFactorView.as_view(), name="mfa_authenticate"),
    path("2fa/", include("allauth.mfa.urls")),
    # Sign-in through identity providers: allauth's pages for a sign-in that needs more.
    # Not its "connections" page: linking a provider's identity to a signed-in account
    # skipped the provider's group and staff rules; it leads to the password page instead.
    path(
        "3rdparty/",
        RedirectView.as_view(pattern_name="account_change_password"),
        name="socialaccount_connections",
    ),
    path("3rdparty/login/cancelled/", social_views.login_cancelled, name="socialaccount_login_cancelled"),
    path("3rdparty/login/error/", social_views.login_error, name="socialaccount_login_error"),
    path("3rdparty/signup/", social_views.signup, name="socialaccount_signup"),
]
